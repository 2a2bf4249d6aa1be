"""DADS: the reward, importance weights, skill dynamics, agent and policy, and the skill model that
planning predicts with (MPPI itself: test_planning.py) (fast, no Ray)."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from choreo import vocabulary as B
from choreo.agents.config import AgentConfig, PlannerConfig
from choreo.agents.dads.config import DadsConfig
from choreo.agents.dads.rewards import alternative_skills, dads_reward, importance_weights, other_skills
from choreo.agents.dads.sac import SquashedNormal
from choreo.agents.dads.skill_dynamics import SkillDynamics, dynamics_loss
from choreo.agents.dads.skill_model import DadsSkillModel
from choreo.agents.planning import DadsPlanningPolicy
from choreo.agents.registry import make_agent, make_policy, registered, shape_keys

torch.set_num_threads(1)

OBS, ACTIONS = 6, 3


def tiny(**dads) -> AgentConfig:
    base = dict(hidden=32, prior_samples=8, dynamics_every=2)
    return AgentConfig(dads=DadsConfig(**{**base, **dads}))


# ----------------------------------------------------------------------------- reward


def gaussian_log_prob(state, skill, next_state):
    """A hand-made q: s' ~ N(s + z, I), exact log-density."""
    diff = next_state - state - skill
    return (-0.5 * diff.square() - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_dads_reward_continuous_matches_hand_computed_densities():
    # Transition 0: s = 0, s' = 0.5, z = 0.5; alternatives -0.5, 1.0, 0.0. With unit variance the
    # ratios q_i / q_z are exp(-d_i^2 / 2) for the distances d_i = 1, 0.5, 0.5 of s' - s - z_i.
    # Transition 1 has its own alternatives, so a mixed-up tiling order would give other values.
    state = torch.tensor([[0.0], [1.0]])
    skill = torch.tensor([[0.5], [0.0]])
    next_state = torch.tensor([[0.5], [1.0]])
    alternatives = torch.tensor([[[-0.5], [1.0], [0.0]], [[2.0], [0.0], [-1.0]]])
    reward, log_q = dads_reward(gaussian_log_prob, state, skill, next_state, alternatives)
    chunked, _ = dads_reward(gaussian_log_prob, state, skill, next_state, alternatives, chunk_rows=3)
    torch.testing.assert_close(chunked, reward)  # one transition per chunk
    expected0 = math.log(4) - math.log(1 + math.exp(-0.5) + 2 * math.exp(-0.125))
    expected1 = math.log(4) - math.log(1 + math.exp(-2.0) + 1 + math.exp(-0.5))
    torch.testing.assert_close(reward, torch.tensor([expected0, expected1]))
    torch.testing.assert_close(log_q, torch.tensor([-0.5 * math.log(2 * math.pi)] * 2))
    # Equal to log q(s'|s,z) - log of the mean density over {z} and the alternatives (paper eq. 6).
    dens = [math.exp(-x * x / 2) for x in (0.0, 1.0, 0.5, 0.5)]
    assert abs(expected0 - (math.log(dens[0]) - math.log(sum(dens) / 4))) < 1e-12


def test_dads_reward_bounds_and_clip():
    state, next_state = torch.zeros(2, 1), torch.zeros(2, 1)
    skill = torch.tensor([[0.0], [100.0]])
    alternatives = torch.tensor([[[1000.0]] * 5, [[0.0]] * 5])
    reward, _ = dads_reward(gaussian_log_prob, state, skill, next_state, alternatives)
    # Alternatives that cannot explain s': the upper bound log(L + 1).
    assert reward[0].item() == pytest.approx(math.log(6), abs=1e-6)
    # The current skill cannot explain s' (log-ratio 5000 -> clipped to 50).
    assert reward[1].item() == pytest.approx(math.log(6) - math.log(1 + 5 * math.exp(50.0)), rel=1e-6)


def test_dads_reward_discrete_sums_exactly_over_all_skills():
    table = torch.log(torch.tensor([0.1, 0.2, 0.4, 0.3]))

    def log_prob(state, skill, next_state):
        return (skill * table).sum(-1)  # q(s'|s,k) = table[k], whatever s, s'

    skill = F.one_hot(torch.tensor([2, 0]), 4).float()
    alternatives = alternative_skills(skill, "discrete", prior_samples=100)
    assert alternatives.shape == (2, 3, 4)
    assert [sorted(a.argmax(-1).tolist()) for a in alternatives] == [[0, 1, 3], [1, 2, 3]]
    reward, _ = dads_reward(log_prob, torch.zeros(2, 1), skill, torch.zeros(2, 1), alternatives)
    # r = log q_z - log mean_k q_k, the mean over all 4 skills being 0.25.
    torch.testing.assert_close(reward, torch.tensor([math.log(0.4 / 0.25), math.log(0.1 / 0.25)]))
    assert torch.equal(other_skills(F.one_hot(torch.tensor([3]), 4).float()).argmax(-1), torch.tensor([[0, 1, 2]]))


def test_continuous_alternatives_are_fresh_prior_samples_per_transition():
    skill = torch.zeros(64, 3)
    alt = alternative_skills(skill, "continuous", 50, torch.Generator().manual_seed(0))
    assert alt.shape == (64, 50, 3)
    assert alt.min() >= -1 and alt.max() <= 1 and alt.min() < -0.99 and alt.max() > 0.99
    assert not torch.equal(alt[0], alt[1])


def test_importance_weights_by_hand():
    current = torch.tensor([0.0, math.log(3.0), 0.0, 5.0, -5.0])
    behaviour = torch.tensor([0.0, 0.0, math.log(2.0), 0.0, 0.0])
    w = importance_weights(current, behaviour, clip=10.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0, 0.5, 10.0, 0.1]))
    assert torch.equal(importance_weights(current, behaviour, clip=1.0), torch.ones(5))  # off, as the reference
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    normalized = importance_weights(current, behaviour, clip=10.0, normalize=True, mask=mask)
    torch.testing.assert_close(normalized, torch.tensor([1.0, 3.0, 0.5, 10.0, 0.1]) / 1.5)


# ----------------------------------------------------------------------------- skill dynamics


def test_skill_dynamics_fits_a_known_linear_system():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    a = torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.05, 0.1], [0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, -2.0], [0.5, 0.5]])
    offset = torch.tensor([3.0, -1.0, 0.0])

    def sample(n):
        s = torch.randn(n, 3, generator=gen)
        z = torch.rand(n, 2, generator=gen) * 2 - 1
        return s, z, s + s @ a.T + z @ b.T + offset + 0.01 * torch.randn(n, 3, generator=gen)

    q = SkillDynamics(3, 2, DadsConfig(hidden=64, norm_momentum=0.05))
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss, metrics = dynamics_loss(q, *sample(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = metrics["dynamics/loss"] if first is None else first
    q.eval()
    s, z, s2 = sample(512)
    delta = s2 - s
    error = (q.predict(s, z) - s2).abs().mean(0) / delta.std(0)
    assert (error < 0.1).all(), error  # a tenth of the change's spread in every dim
    # With unit variances in the standardised space the loss cannot go below 3/2 log(2 pi).
    floor = 1.5 * math.log(2 * math.pi)
    assert first.item() > floor + 1.0 and loss.item() < floor + 0.05
    # Running statistics of the target approach the true change's mean and variance.
    torch.testing.assert_close(q.target_norm.mean, delta.mean(0), atol=0.15, rtol=0.05)
    torch.testing.assert_close(q.target_norm.var, delta.var(0), atol=0.2, rtol=0.15)
    # The true next state is more likely under its own skill than under a wrong one.
    assert (q.log_prob(s, z, s2) > q.log_prob(s, -z, s2)).float().mean() > 0.95


def test_running_statistics_move_only_in_training_and_ignore_masked_rows():
    q = SkillDynamics(2, 1, DadsConfig(hidden=8))
    s, z = torch.zeros(4, 2), torch.zeros(4, 1)
    s2 = torch.tensor([[1.0, 1.0], [1.0, 1.0], [float("nan"), 0.0], [1e6, 1e6]])
    q.eval()
    q.log_prob(s[:2], z[:2], s2[:2])
    assert torch.equal(q.target_norm.mean, torch.zeros(2))
    q.train()
    loss, _ = dynamics_loss(q, s, z, s2, mask=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.isfinite(loss)
    torch.testing.assert_close(q.target_norm.mean, torch.full((2,), 0.01))  # momentum 0.01 toward 1
    q.log_prob(s, z, s2)  # a NaN batch statistic is not absorbed
    assert torch.isfinite(q.target_norm.mean).all() and torch.isfinite(q.target_norm.var).all()


def test_xy_prior_with_omission_leaves_q_blind_to_the_state():
    q = SkillDynamics(5, 2, DadsConfig(hidden=8, dynamics_dims=(0, 1), omit_coordinates=2)).eval()
    assert q.state_dims == (0, 1) and q.input_positions == () and q.input_norm is None
    obs = torch.randn(4, 5)
    assert torch.equal(q.project(obs), obs[:, :2])
    z = torch.rand(4, 2)
    delta = torch.randn(4, 2)
    s1, s2 = torch.randn(4, 2), torch.randn(4, 2) * 10
    torch.testing.assert_close(q.log_prob(s1, z, s1 + delta), q.log_prob(s2, z, s2 + delta))
    omitted = SkillDynamics(5, 2, DadsConfig(hidden=8, omit_coordinates=2))
    assert omitted.state_dims == (0, 1, 2, 3, 4) and omitted.input_positions == (2, 3, 4)


# ----------------------------------------------------------------------------- agent and policy


def rollout_batch(policy, seed=0, b=3, t=7, obs_dim=OBS):
    """A batch in the shared layout made by acting with `policy` on random observations, with an
    episode start inside sequence 1 and random seed actions (version -1) at the start of sequence 2."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(b, t, obs_dim)).astype(np.float32)
    first = np.zeros((b, t), bool)
    first[:, 0] = True
    first[1, 4] = True
    batch = {
        B.OBSERVATION: obs, B.IS_FIRST: first,
        B.ACTION: np.zeros((b, t, ACTIONS), np.float32),
        B.SKILL_VECTOR: np.zeros((b, t, policy.skill_dim), np.float32),
        B.BEHAVIOUR_LOGP: np.zeros((b, t), np.float32),
        B.DISCOUNT: np.ones((b, t), np.float32),
        B.REWARD: np.zeros((b, t), np.float32),
        B.POLICY_VERSION: np.ones((b, t), np.int64),
    }
    batch[B.POLICY_VERSION][2, :3] = -1
    state = policy.initial_state(b)
    for i in range(t - 1):
        action, state, extras = policy.act(obs[:, i], first[:, i], state)
        batch[B.ACTION][:, i + 1] = action
        batch[B.SKILL_VECTOR][:, i + 1] = extras["skill_vector"]
        batch[B.BEHAVIOUR_LOGP][:, i + 1] = extras["behaviour_logp"]
    return batch


def agent_and_policy(cfg=None, seed=0):
    cfg = cfg or tiny()
    agent = make_agent("dads", (OBS,), ACTIONS, cfg, seed=seed, device="cpu")
    policy = make_policy("dads", (OBS,), ACTIONS, cfg, seed=seed + 1)
    policy.load_weights(agent.policy_weights(), 0)
    return agent, policy


def test_registry_knows_dads():
    from choreo.agents.dads import DadsAgent, DadsPolicy

    assert {"choreographer", "dads"} <= set(registered())
    agent, policy = agent_and_policy()
    assert isinstance(agent, DadsAgent) and isinstance(policy, DadsPolicy)
    assert shape_keys("dads") == DadsAgent.SHAPE_KEYS and "dads.hidden" in shape_keys("dads")
    assert isinstance(AgentConfig().dads, DadsConfig) and "dads" in {f.name for f in dataclasses.fields(AgentConfig)}
    with pytest.raises(ValueError, match="state observations"):
        make_agent("dads", (3, 64, 64), ACTIONS, tiny(), device="cpu")


@pytest.mark.parametrize("skill_type", ["continuous", "discrete"])
def test_agent_update_trains_everything_with_finite_losses(skill_type):
    cfg = tiny(skill_type=skill_type, skill_dim=4 if skill_type == "discrete" else 2, omit_coordinates=2)
    agent, policy = agent_and_policy(cfg)
    before = {k: v.clone() for k, v in agent.state_dict().items() if isinstance(v, torch.Tensor)}
    metrics = agent.update(rollout_batch(policy))
    for key in ("dynamics/loss", "dads/reward", "sac/critic/loss", "sac/actor/loss", "sac/alpha/loss"):
        assert np.isfinite(metrics[key]), key
    assert metrics["learner/nonfinite"] == 0.0 and int(agent.updates) == 1
    # Same weights acted: every importance weight is exactly 1.
    assert metrics["dynamics/importance_weight"] == pytest.approx(1.0, abs=1e-5)
    # 3 x 6 transitions; one crosses the episode start, two have random seed actions (action[1],
    # action[2] of sequence 2; action[0] belongs to no transition).
    assert metrics["dads/valid_fraction"] == pytest.approx(15 / 18)
    # Discrete rewards are bounded by log(number of skills); continuous by log(L + 1).
    bound = math.log(4) if skill_type == "discrete" else math.log(9)
    assert metrics["dads/reward"] <= bound + 1e-6
    after = agent.state_dict()
    for prefix in ("dynamics.net", "dynamics.target_norm.mean", "sac.actor", "sac.critic1", "sac.critic2",
                   "sac.target1", "sac.log_alpha"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    # The second update (dynamics_every = 2) leaves q alone.
    q_before = {k: v.clone() for k, v in agent.dynamics.state_dict().items()}
    metrics = agent.update(rollout_batch(policy, seed=1))
    assert "dynamics/loss" not in metrics
    assert all(torch.equal(q_before[k], v) for k, v in agent.dynamics.state_dict().items())


def test_reset_rows_may_hold_anything():
    agent, policy = agent_and_policy()
    batch = rollout_batch(policy)
    for key in (B.ACTION, B.SKILL_VECTOR, B.BEHAVIOUR_LOGP):
        batch[key][batch[B.IS_FIRST]] = np.nan  # left-out rows: never part of a transition
    batch[B.BEHAVIOUR_LOGP][2, :3] = np.nan  # random seed actions: no skill chose them
    metrics = agent.update(batch)
    assert metrics["learner/nonfinite"] == 0.0
    assert all(torch.isfinite(v).all() for v in agent.state_dict().values() if isinstance(v, torch.Tensor)
               and v.is_floating_point())


def test_state_dict_round_trip_continues_identically():
    agent, policy = agent_and_policy()
    batches = [rollout_batch(policy, seed=i) for i in range(4)]
    agent.update(batches[0])
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    buffer.seek(0)
    clone = make_agent("dads", (OBS,), ACTIONS, tiny(), seed=123, device="cpu")
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    for batch in batches[1:]:  # updates with and without a q step
        ma, mb = agent.update(batch), clone.update(batch)
        assert {k: v for k, v in ma.items() if not k.startswith("time/")} == \
            {k: v for k, v in mb.items() if not k.startswith("time/")}
    for (name, a), b in zip(agent.state_dict().items(), clone.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_policy_weights_load_strictly_into_a_fresh_policy():
    agent, _ = agent_and_policy()
    weights = agent.policy_weights()
    fresh = make_policy("dads", (OBS,), ACTIONS, tiny(), seed=9)
    assert set(weights) == set(fresh.expected_weights())
    fresh.load_weights(weights, version=7)
    assert fresh.version == 7
    for name, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights[name])
    with pytest.raises(ValueError, match="missing"):
        fresh.load_weights({k: v for k, v in weights.items() if k != next(iter(weights))}, 8)
    with pytest.raises(ValueError, match="unexpected"):
        fresh.load_weights({**weights, "critic.w": np.zeros(1)}, 8)
    name = next(iter(weights))
    with pytest.raises(ValueError, match="shape"):
        fresh.load_weights({**weights, name: np.zeros((1, 1))}, 8)


def test_policy_holds_the_skill_within_an_episode_and_redraws_at_episode_start():
    _, policy = agent_and_policy(tiny(skill_dim=3))
    n = 4
    obs = np.random.default_rng(0).normal(size=(n, OBS)).astype(np.float32)
    state = policy.initial_state(n)
    first = np.ones(n, bool)
    action, state, extras = policy.act(obs, first, state)
    assert action.shape == (n, ACTIONS) and action.dtype == np.float32 and np.abs(action).max() < 1
    assert extras["skill_vector"].shape == (n, 3) and extras["skill_vector"].dtype == np.float32
    assert extras["behaviour_logp"].shape == (n,) and extras["behaviour_logp"].dtype == np.float32
    assert extras["skill"].shape == (n,) and extras["skill"].dtype == np.int32 and (extras["skill"] == -1).all()
    assert np.abs(extras["skill_vector"]).max() <= 1
    held = extras["skill_vector"]
    for _ in range(3):
        _, state, extras = policy.act(obs, np.zeros(n, bool), state)
        np.testing.assert_array_equal(extras["skill_vector"], held)
    first = np.array([False, True, False, True])
    _, state, extras = policy.act(obs, first, state)
    np.testing.assert_array_equal(extras["skill_vector"][~first], held[~first])
    assert (extras["skill_vector"][first] != held[first]).all()
    # The behaviour log-probability is that of the returned action.
    d = policy.cfg.dads
    dist = SquashedNormal.from_output(policy.actor(torch.cat([torch.from_numpy(obs), torch.from_numpy(
        extras["skill_vector"])], -1)), d.log_std_min, d.log_std_max)
    action, _, extras2 = policy.act(obs, np.zeros(n, bool), state)
    torch.testing.assert_close(dist.log_prob(torch.from_numpy(action)), torch.from_numpy(extras2["behaviour_logp"]))
    # A given skill is held across episode starts; "mode" acts deterministically.
    state = policy.initial_state(n, skill=[0.5, -0.5, 0.0])
    a1, state, extras = policy.act(obs, np.ones(n, bool), state, mode="mode")
    a2, state, extras = policy.act(obs, np.ones(n, bool), state, mode="mode")
    np.testing.assert_array_equal(extras["skill_vector"], np.tile([[0.5, -0.5, 0.0]], (n, 1)))
    np.testing.assert_array_equal(a1, a2)


def test_discrete_policy_reports_skill_indices():
    _, policy = agent_and_policy(tiny(skill_type="discrete", skill_dim=5))
    obs = np.zeros((6, OBS), np.float32)
    _, _, extras = policy.act(obs, np.ones(6, bool), policy.initial_state(6))
    assert ((extras["skill"] >= 0) & (extras["skill"] < 5)).all()
    np.testing.assert_array_equal(extras["skill_vector"], np.eye(5, dtype=np.float32)[extras["skill"]])
    _, _, extras = policy.act(obs, np.ones(6, bool), policy.initial_state(6, skill=3))
    assert (extras["skill"] == 3).all()
    with pytest.raises(ValueError, match="out of range"):
        policy.initial_state(2, skill=5)


def test_agent_drives_planning_with_its_skill_dynamics():
    agent, _ = agent_and_policy(tiny(dynamics_dims=(0, 1)))
    model = DadsSkillModel(agent)
    start = torch.randn(3, OBS)
    plans = torch.rand(3, 5, 2, 2) * 2 - 1  # [M, K, H_P, D]
    with torch.inference_mode():
        predicted = model.imagine(start, plans, 3, None)
    assert predicted.shape == (3, 5, 6, OBS)
    state = start[:, None, :2].expand(3, 5, 2)
    for t in range(6):  # q's mean step by step, each segment's skill held 3 steps
        state = agent.skill_dynamics_step(state, plans[:, :, t // 3])
        torch.testing.assert_close(predicted[:, :, t, :2], state)
    assert torch.equal(predicted[..., 2:], start[:, None, None, 2:].expand(3, 5, 6, OBS - 2))
    cfg = PlannerConfig(candidates=8, iterations=2, hold=3)
    policy = DadsPlanningPolicy(agent, lambda obs, env: -obs[..., :2].norm(dim=-1), cfg)
    action, state, _ = policy.act(start.numpy(), np.ones(3, bool), policy.initial_state(3))
    assert action.shape == (3, ACTIONS) and state.skill.shape == (3, 2) and torch.isfinite(state.skill).all()
    assert torch.isfinite(state.predicted_return).all()


def test_the_temperature_targets_minus_half_the_action_dims_as_the_reference_sac():
    from choreo.agents.dads.sac import alpha_loss
    from choreo.launch.runtime.config import load_config

    assert DadsConfig().target_entropy_scale == 0.5  # tf-agents 0.4.0 SacAgent's default, -|A| / 2
    assert load_config([], ["algo=dads"]).agent.dads.target_entropy_scale == 0.5
    agent, _ = agent_and_policy()
    assert agent.sac.target_entropy == -ACTIONS / 2
    # A policy whose entropy (-log pi = -2) is below -|A| / 2 = -1.5 but above -|A| = -3: alpha must
    # grow (a negative gradient on log alpha); with SAC's usual target -|A| it would shrink.
    log_alpha = torch.zeros((), requires_grad=True)
    loss, _ = alpha_loss(log_alpha, torch.full((8,), 2.0), agent.sac.target_entropy, torch.ones(8, dtype=torch.bool))
    loss.backward()
    assert log_alpha.grad < 0
