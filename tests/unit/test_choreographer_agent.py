"""The assembled Choreographer agent: updates, reward gate, meta-controller, checkpoints, policy."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from choreo import vocabulary as B
from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.meta import MetaController
from choreo.agents.choreographer.policy import ChoreographerPolicy
from choreo.agents.distributions import TruncatedNormal
from choreo.agents.registry import make_agent, make_policy, registered
from choreo.launch.runtime.build import random_batch
from choreo.launch.runtime.config import load_config

STATE_SHAPE, PIXEL_SHAPE, ACTIONS = (24,), (3, 64, 64), 6


def tiny(*overrides: str):
    return load_config(["tiny"], list(overrides)).agent


def make(obs_shape=STATE_SHAPE, seed=0, cfg=None) -> ChoreographerAgent:
    return ChoreographerAgent(obs_shape, ACTIONS, cfg or tiny(), seed=seed, device="cpu")


def batch(obs_shape=STATE_SHAPE, seed=0, reward=0.0, b=3, t=6):
    return random_batch(np.random.default_rng(seed), obs_shape, b, t, reward_scale=reward)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in params(module).items())


@pytest.mark.parametrize("obs_shape", [STATE_SHAPE, PIXEL_SHAPE], ids=["states", "pixels"])
def test_pretrain_update_trains_every_part(obs_shape):
    agent = make(obs_shape)
    parts = {name: params(getattr(agent, name)) for name in ("wm", "lbs", "explore_ac", "skills", "skill_ac")}
    meta_before = params(agent.meta)
    metrics = agent.update(batch(obs_shape))
    for name, before in parts.items():
        assert changed(before, getattr(agent, name)), name
    assert not changed(meta_before, agent.meta), "the meta-controller must not train during pretraining"
    for key in ("world_model/loss", "explore/actor/loss", "codebook/active_codes", "skill_ac/critic/loss",
                "time/knn_reward_s", "time/world_model_s"):
        assert key in metrics, key
        assert np.isfinite(metrics[key]), key
    assert int(agent.updates) == 1


def test_registry_selects_choreographer():
    assert "choreographer" in registered()
    cfg = tiny()
    agent = make_agent("choreographer", STATE_SHAPE, ACTIONS, cfg, seed=0, device="cpu")
    policy = make_policy("choreographer", STATE_SHAPE, ACTIONS, cfg)
    assert isinstance(agent, ChoreographerAgent) and isinstance(policy, ChoreographerPolicy)
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        make_agent("nope")


def test_world_model_loss_falls_on_real_walker_transitions():
    from choreo.actors.envs import make_env
    from choreo.agents.actor_critic import Optimizer
    from choreo.agents.world_model import WorldModel, world_model_loss

    env = make_env("walker_walk", obs="states", seed=0)
    rng = np.random.default_rng(0)
    obs_list, act_list = [], []
    obs, _ = env.reset(seed=0)
    action = np.zeros(env.action_space.shape, np.float32)
    for _ in range(400):
        obs_list.append(obs)
        act_list.append(action)
        action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        obs, _, _, _, _ = env.step(action)
    obs_arr, act_arr = torch.from_numpy(np.stack(obs_list)), torch.from_numpy(np.stack(act_list))
    # Tiny, but wide enough to learn walker's dynamics (velocities dominate the loss) in 100 steps.
    cfg = dataclasses.replace(tiny().world_model, lr=1e-3, mlp_units=128, deter=64, hidden=64)
    torch.manual_seed(0)
    wm = WorldModel(tuple(obs_arr.shape[1:]), act_arr.shape[1], cfg)
    opt = Optimizer(wm.parameters(), cfg.lr, cfg.eps, cfg.grad_clip)
    losses = []
    for i in range(100):
        idx = torch.from_numpy(np.random.default_rng(i).integers(0, len(obs_arr) - 20, 8))[:, None] + torch.arange(20)
        is_first = torch.zeros(idx.shape, dtype=torch.bool)
        is_first[:, 0] = True
        data = {B.OBSERVATION: obs_arr[idx], B.ACTION: act_arr[idx], B.REWARD: torch.zeros(idx.shape),
                B.IS_FIRST: is_first}
        loss, _, _ = world_model_loss(wm, data)
        opt.step(loss)
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses


def test_reward_gate_stays_closed_on_zero_rewards_and_opens_at_threshold():
    agent = make()
    agent.finetune_mode()
    meta_before, skill_before = params(agent.meta), params(agent.skill_ac.actor)
    zero = batch(reward=0.0)
    below = dict(zero, **{B.REWARD: np.full_like(zero[B.REWARD], 0.99e-4)})
    for data in (zero, below):
        metrics = agent.update(data)
        assert metrics["meta/gate_open"] == 0.0
    assert not bool(agent.gate_open)
    assert not changed(meta_before, agent.meta) and not changed(skill_before, agent.skill_ac.actor)

    at_threshold = dict(zero, **{B.REWARD: zero[B.REWARD].copy()})
    at_threshold[B.REWARD][1, 2] = 1e-4
    metrics = agent.update(at_threshold)
    assert metrics["meta/gate_open"] == 1.0 and bool(agent.gate_open)
    assert changed(meta_before, agent.meta) and changed(skill_before, agent.skill_ac.actor)
    # The gate never closes again.
    assert agent.update(zero)["meta/gate_open"] == 1.0


def test_finetune_mode_resets_reward_head_and_keeps_pretrained_skills():
    agent = make()
    agent.update(batch())
    reward_before, skill_actor_before = params(agent.wm.reward), params(agent.skill_ac.actor)
    encoder_before = params(agent.wm.encoder)
    agent.finetune_mode()
    assert changed(reward_before, agent.wm.reward)
    assert not changed(skill_actor_before, agent.skill_ac.actor)
    assert not changed(encoder_before, agent.wm.encoder)
    assert agent.mode == "finetune" and not bool(agent.gate_open)


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_skills_trains_only_the_meta_controller(freeze):
    agent = make(cfg=tiny(f"agent.finetune.freeze_skills={str(freeze).lower()}"))
    agent.finetune_mode()
    skill_actor, meta_actor = params(agent.skill_ac.actor), params(agent.meta.actor)
    metrics = agent.update(batch(reward=1.0))  # the gate opens: meta-controller (and executor) train
    assert metrics["meta/gate_open"] == 1.0
    assert changed(meta_actor, agent.meta.actor)
    assert changed(skill_actor, agent.skill_ac.actor) is not freeze
    assert ("meta/executor/loss" in metrics) is not freeze


class _FakeSkillActor:
    """Code `good` moves to +0.9, every other code to -0.9 (a fixed executor)."""

    def __init__(self, good: int):
        self.good = good

    def policy(self, feat, code):
        mean = torch.where(code.argmax(-1, keepdim=True) == self.good, 0.9, -0.9).expand(-1, ACTIONS)
        return TruncatedNormal(mean, torch.full_like(mean, 0.05))


class _NoStep:
    def step(self, loss):
        return {}


def test_meta_controller_learns_to_prefer_the_rewarded_code():
    cfg = dataclasses.replace(tiny().actor_critic, actor_lr=1e-3, critic_lr=1e-3, horizon=4)
    agent = make()
    wm = agent.wm
    codes, good = 8, 5

    # A toy world: the next deterministic state records the action, the reward reads it back.
    def img_step(prev, action, generator=None):
        deter = torch.zeros_like(prev.deter)
        deter[:, :ACTIONS] = action
        return type(prev)(deter, torch.zeros_like(prev.stoch), torch.zeros_like(prev.logits))

    class FirstActionDim(torch.nn.Module):
        def forward(self, feat):
            return feat[..., -wm.rssm.deter:-wm.rssm.deter + 1]

    wm.rssm.img_step = img_step
    wm.reward = FirstActionDim()
    meta = MetaController(wm.feat_dim, codes, cfg, entropy_scale=1e-4)
    start = wm.rssm.initial(64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        meta.update(wm, _FakeSkillActor(good), _NoStep(), start, generator)
    probs = meta.policy(wm.rssm.feature(start)).probs.mean(0)
    assert int(probs.argmax()) == good
    assert float(probs[good]) > 0.5, probs


def _roundtrip(agent: ChoreographerAgent) -> dict:
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("finetune", [False, True], ids=["pretrain", "finetune"])
def test_state_dict_roundtrip_continues_exactly(finetune):
    agent = make(seed=1)
    if finetune:
        agent.update(batch(seed=5))
        agent.finetune_mode()
    for i in range(2):
        agent.update(batch(seed=i, reward=1.0))
    restored = make(seed=99)  # different init and generator: everything must come from the checkpoint
    restored.load_state_dict(_roundtrip(agent))
    assert restored.mode == agent.mode
    next_batch = batch(seed=7, reward=1.0)
    m1, m2 = agent.update(next_batch), restored.update(next_batch)
    m1 = {k: v for k, v in m1.items() if not k.startswith("time/")}
    m2 = {k: v for k, v in m2.items() if not k.startswith("time/")}
    assert m1 == m2
    for (k, v1), v2 in zip(agent.state_dict().items(), restored.state_dict().values()):
        if isinstance(v1, torch.Tensor):
            assert torch.equal(v1, v2), k


def test_policy_weights_load_strictly_into_a_fresh_policy():
    cfg = tiny()
    agent = make(cfg=cfg)
    agent.update(batch())
    weights = agent.policy_weights()
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    assert not any(k.startswith(("decoder", "critic", "reward", "lbs")) for k in weights)
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="explore", seed=3)
    policy.load_weights(weights, version=4)
    assert policy.version == 4
    for name, value in policy.state_dict().items():
        assert np.array_equal(value.numpy(), weights[name]), name

    with pytest.raises(ValueError, match="missing"):
        policy.load_weights({k: v for k, v in weights.items() if k != "gate_open"}, version=5)
    bad = dict(weights)
    key = next(k for k in weights if k.startswith("encoder."))
    bad[key] = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match=f"'{key}' has shape"):
        policy.load_weights(bad, version=5)


def test_policy_filters_like_the_world_model():
    cfg = tiny()
    agent = make(cfg=cfg)
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="explore")
    policy.load_weights(agent.policy_weights(), version=0)
    obs = np.random.default_rng(0).standard_normal((5, *STATE_SHAPE)).astype(np.float32)
    action, state, extras = policy.act(obs, np.ones(5, bool), policy.initial_state(5), mode="mode")
    with torch.no_grad():
        embed = agent.wm.encode(torch.from_numpy(obs))
        post, _ = agent.wm.rssm.obs_step(agent.wm.rssm.initial(5), torch.zeros(5, ACTIONS), embed,
                                         torch.ones(5, dtype=torch.bool))
    assert torch.allclose(state.latent.logits, post.logits, atol=1e-6)
    assert action.shape == (5, ACTIONS) and action.dtype == np.float32
    assert np.all(np.abs(action) <= 1.0)
    assert np.all(extras["skill"] == -1)


def test_policy_resets_state_on_is_first():
    cfg = tiny()
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="explore")
    obs = np.random.default_rng(1).standard_normal((2, *STATE_SHAPE)).astype(np.float32)
    _, state, _ = policy.act(obs, np.ones(2, bool), policy.initial_state(2), mode="mode")
    _, state, _ = policy.act(obs, np.zeros(2, bool), state, mode="mode")
    _, reset, _ = policy.act(obs, np.array([True, False]), state, mode="mode")
    _, fresh, _ = policy.act(obs, np.ones(2, bool), policy.initial_state(2), mode="mode")
    assert torch.equal(reset.latent.deter[0], fresh.latent.deter[0])
    assert not torch.equal(reset.latent.deter[1], fresh.latent.deter[1])


def test_meta_policy_holds_random_skills_until_the_gate_opens():
    cfg = tiny("agent.choreographer.random_skill_every=4")
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="meta", seed=0)
    obs = np.zeros((16, *STATE_SHAPE), np.float32)
    state = policy.initial_state(16)
    skills = []
    for t in range(8):
        _, state, extras = policy.act(obs, np.full(16, t == 0), state)
        skills.append(extras["skill"])
    skills = np.stack(skills)  # [8, 16]
    assert np.all(skills >= 0)
    assert np.all(skills[:4] == skills[0]) and np.all(skills[4:] == skills[4])
    assert np.any(skills[0] != skills[4])  # redrawn after 4 steps

    policy.gate_open.fill_(True)
    for _ in range(2):
        _, state, extras = policy.act(obs, np.zeros(16, bool), state)
        assert torch.all(state.skill_steps == 1)  # a code is drawn at every step once the gate is open


def test_skill_policy_uses_the_given_code():
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, tiny(), behaviour="skill")
    state = policy.initial_state(3, skill=2)
    _, state, extras = policy.act(np.zeros((3, *STATE_SHAPE), np.float32), np.ones(3, bool), state)
    assert np.all(extras["skill"] == 2)
    with pytest.raises(ValueError, match="out of range"):
        policy.initial_state(1, skill=99)


def test_bf16_autocast_runs_on_cpu():
    agent = make(cfg=tiny("agent.precision.autocast=bf16"))
    metrics = agent.update(batch())
    assert np.isfinite(metrics["world_model/loss"])


def test_bf16_autocast_keeps_returns_and_targets_in_float32(monkeypatch):
    """Under bf16 autocast rewards and values come out in bfloat16; the lambda-returns (and with
    them the advantages and critic targets) of the exploration, skill and meta actor-critics are
    computed in float32."""
    import choreo.agents.actor_critic as actor_critic

    seen = []
    original = actor_critic._lambda_return

    def spy(reward, next_value, discount, lambda_):
        out = original(reward, next_value, discount, lambda_)
        seen.append((reward.dtype, out.dtype))
        return out

    monkeypatch.setattr(actor_critic, "_lambda_return", spy)
    agent = make(cfg=tiny("agent.precision.autocast=bf16"))
    agent.update(batch())  # pretraining: exploration and skill actor-critics
    agent.finetune_mode()
    agent.update(batch(reward=1.0))  # the gate opens: the meta-controller trains
    assert len(seen) == 3
    assert any(inputs == torch.bfloat16 for inputs, _ in seen), "autocast was not in effect"
    assert all(out == torch.float32 for _, out in seen), seen


@pytest.mark.gpu
def test_cuda_update_with_bf16_autocast_matches_checkpoint_round_trip():
    agent = ChoreographerAgent(STATE_SHAPE, ACTIONS, tiny(), seed=0, device="cuda")
    assert agent._autocast == torch.bfloat16  # "auto" means bf16 autocast on CUDA
    metrics = agent.update(batch())
    assert np.isfinite(metrics["world_model/loss"]) and np.isfinite(metrics["skill_ac/actor/loss"])
    restored = ChoreographerAgent(STATE_SHAPE, ACTIONS, tiny(), seed=5, device="cuda")
    restored.load_state_dict(_roundtrip(agent))
    weights = restored.policy_weights()
    ChoreographerPolicy(STATE_SHAPE, ACTIONS, tiny()).load_weights(weights, version=1)


def test_reward_parts_are_metrics_that_add_up_to_the_rewards():
    agent = make()
    metrics = agent.update(batch())
    for key in ("skill_ac/reward_knn", "skill_ac/reward_code", "explore/reward_raw"):
        assert np.isfinite(metrics[key]), key
    assert metrics["skill_ac/reward_knn"] >= 0.0 and metrics["skill_ac/reward_code"] <= 0.0  # distances, and minus one
    # the skill reward is their sum, averaged over the same imagined states
    assert metrics["skill_ac/reward_knn"] + metrics["skill_ac/reward_code"] == pytest.approx(
        metrics["skill_ac/reward_mean"], rel=1e-4, abs=1e-5)


def test_skill_policy_needs_its_skills():
    cfg = tiny()
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="skill")
    with pytest.raises(ValueError, match="skill behaviour runs the skills you choose"):
        policy.initial_state(3)
    state = policy.initial_state(3, skill=np.array([1, 0, 7]))  # one code per environment
    assert state.skill.tolist() == [1, 0, 7]
    for bad, match in ((np.array([1, 2]), "2 skills for 3 environments"), (np.array([0.5, 1, 2]), "integer codes"),
                       (np.array([0, 8, 1]), "skill 8 is out of range 0..7"), (np.zeros((3, 1), int), "shape")):
        with pytest.raises(ValueError, match=match):
            policy.initial_state(3, skill=bad)
    # Set on the policy, for callers that call initial_state(n) alone (the EnvRunner)
    policy.set_skills(5)
    assert policy.initial_state(2).skill.tolist() == [5, 5]
    given = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="skill", skill=[2, 4])
    _, _, extras = given.act(np.zeros((2, *STATE_SHAPE), np.float32), np.ones(2, bool), given.initial_state(2))
    assert extras["skill"].tolist() == [2, 4]
    with pytest.raises(ValueError, match="2 skills for 3 environments"):
        given.initial_state(3)
    given.set_skills(None)
    with pytest.raises(ValueError, match="skill behaviour"):
        given.initial_state(2)
    # The other behaviours need none; exploration reports no code.
    explore = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="explore")
    assert explore.initial_state(2).skill.tolist() == [-1, -1]
    assert ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="meta").initial_state(2).skill.tolist() == [-1, -1]


def test_env_runner_runs_the_skills_set_on_the_policy():
    from choreo.actors.envs import make_env
    from choreo.actors.runner import EnvRunner

    agent = make()
    policy = make_policy("choreographer", STATE_SHAPE, ACTIONS, agent.cfg, behaviour="skill", skill=[3, 6])
    policy.load_weights(agent.policy_weights(), 0)
    runner = EnvRunner([make_env("walker_stand", seed=i) for i in range(2)], policy, chunk_length=4, runner_id=0,
                       seed=0, mode="mode")
    try:
        chunks = runner.run(4)
    finally:
        runner.close()
    skills = {stream: chunk[B.SKILL] for stream, chunk in chunks}
    assert skills[0][1:].tolist() == [3, 3, 3] and skills[1][1:].tolist() == [6, 6, 6]  # row 0: the reset row


@pytest.mark.parametrize("behaviour", ["explore", "skill"])
def test_mode_acting_is_deterministic_and_sampling_unchanged(behaviour):
    cfg = tiny()
    agent = make(cfg=cfg)
    policies = [ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour=behaviour, seed=seed, skill=1)
                for seed in (0, 1)]
    for p in policies:
        p.load_weights(agent.policy_weights(), 0)
    obs = np.random.default_rng(2).standard_normal((4, 3, *STATE_SHAPE)).astype(np.float32)  # [T, N, ...]
    runs = []
    for p in policies:
        generator_before = p.generator.get_state()
        state, actions = p.initial_state(3), []
        for t in range(4):
            action, state, _ = p.act(obs[t], np.full(3, t == 0), state, mode="mode")
            actions.append(action)
            # the latent is the mode of each categorical
            expected = torch.nn.functional.one_hot(state.latent.logits.argmax(-1), cfg.world_model.classes)
            assert torch.equal(state.latent.stoch, expected.float())
        assert torch.equal(p.generator.get_state(), generator_before)  # nothing was drawn
        runs.append(np.stack(actions))
    np.testing.assert_array_equal(runs[0], runs[1])  # policies seeded apart act alike

    # "sample" draws the latent and the action from the policy's generator, as before
    p = policies[0]
    p.generator.manual_seed(5)
    action, state, _ = p.act(obs[0], np.ones(3, bool), p.initial_state(3), mode="sample")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        embed = agent.wm.encode(torch.from_numpy(obs[0]))
        post = agent.wm.rssm.posterior_step(agent.wm.rssm.initial(3), torch.zeros(3, ACTIONS), embed,
                                            torch.ones(3, dtype=torch.bool), generator)
    assert torch.equal(state.latent.stoch, post.stoch)
    with pytest.raises(ValueError, match="unknown mode"):
        p.act(obs[0], np.ones(3, bool), p.initial_state(3), mode="mean")


def test_evaluation_takes_the_latents_mode_or_samples_it_as_configured():
    assert tiny().choreographer.eval_latent == "mode"
    cfg = tiny("agent.choreographer.eval_latent=sample")  # the reference's eval_state_mean: False
    agent = make(cfg=cfg)
    policy = ChoreographerPolicy(STATE_SHAPE, ACTIONS, cfg, behaviour="explore")
    policy.load_weights(agent.policy_weights(), 0)
    obs = np.random.default_rng(3).standard_normal((3, *STATE_SHAPE)).astype(np.float32)
    policy.generator.manual_seed(5)
    action, state, _ = policy.act(obs, np.ones(3, bool), policy.initial_state(3), mode="mode")
    with torch.no_grad():
        embed = agent.wm.encode(torch.from_numpy(obs))
        post = agent.wm.rssm.posterior_step(agent.wm.rssm.initial(3), torch.zeros(3, ACTIONS), embed,
                                            torch.ones(3, dtype=torch.bool), torch.Generator().manual_seed(5))
        mean = TruncatedNormal.from_output(policy.explore_actor(agent.wm.rssm.feature(post)),
                                           cfg.actor_critic.actor_min_std).mode
    assert torch.equal(state.latent.stoch, post.stoch)  # a draw from the posterior, with the policy's generator
    np.testing.assert_allclose(action, mean.numpy(), atol=1e-6)  # the action is still the mean
