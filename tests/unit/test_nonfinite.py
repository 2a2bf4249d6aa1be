"""NaN or infinite losses: every optimizer step is skipped on the device, no state outside the
optimizers absorbs them, the agent reports it, and the learner stops after too many in a row."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import choreo.agents.actor_critic as actor_critic
from choreo import vocabulary as B
from choreo.agents.actor_critic import Optimizer, update_slow_target
from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.rewards import RunningMagnitude
from choreo.agents.choreographer.skills import SkillAutoEncoder
from choreo.agents.config import ActorCriticConfig, ChoreographerConfig
from choreo.launch.runtime.build import random_batch
from choreo.launch.runtime.config import load_config
from choreo.learner.learner import CHECKPOINT, Learner, NonFiniteLossError

NAN = float("nan")


def flat(obj, prefix=""):
    """Every tensor and leaf of a (nested) state dict, by path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj.detach().clone() if isinstance(obj, torch.Tensor) else copy.deepcopy(obj)


def snapshot(module) -> dict:
    return dict(flat(module.state_dict()))


def differing(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    out = set()
    for k, v in before.items():
        w = after[k]
        same = torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
        if not same:
            out.add(k)
    return out


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


# ---- the optimizer --------------------------------------------------------------------------


def _opt_state(opt: Optimizer) -> dict:
    return dict(flat(opt.state_dict()))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "inf_grad"])
def test_optimizer_skips_a_nonfinite_step_entirely(fused, kind, monkeypatch):
    if not fused:
        monkeypatch.setattr(actor_critic, "_fused_adam_ok", lambda params: False)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.rand(3, 4) + 0.5), torch.nn.Parameter(torch.rand(5) + 0.5)]
    opt = Optimizer(params, lr=0.1, eps=1e-8, grad_clip=1.0, weight_decay=0.1, name="test")
    assert opt.fused == fused

    m = opt.step(sum((p * p).sum() for p in params))  # a finite step first: Adam state exists
    assert float(m["test/nonfinite"]) == 0.0
    before_params = [p.detach().clone() for p in params]
    before_state = _opt_state(opt)

    if kind == "nan_loss":
        loss = sum((p * NAN).sum() for p in params)
    elif kind == "inf_loss":
        loss = sum((p * float("inf")).sum() for p in params)
    else:  # finite loss, infinite gradient: d sqrt(x)/dx at 0
        loss = torch.sqrt(params[0] * 0.0).sum() + params[1].sum()
        assert math.isfinite(float(loss.detach()))
    m = opt.step(loss)
    assert float(m["test/nonfinite"]) == 1.0
    assert m["test/nonfinite"].shape == () and m["test/nonfinite"].dtype == torch.float32
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)  # no Adam step and no weight decay
    assert not differing(before_state, _opt_state(opt))  # moments and step count as they were

    m = opt.step(sum((p * p).sum() for p in params))  # finite again: the step is taken
    assert float(m["test/nonfinite"]) == 0.0
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before_params))
    steps = [v for k, v in _opt_state(opt).items() if k.endswith("/step")]
    assert steps and all(float(s) == 2.0 for s in steps)  # the skipped step was not counted


def test_optimizer_first_step_skipped_starts_adam_from_zero():
    param = torch.nn.Parameter(torch.ones(3))
    opt = Optimizer([param], lr=0.1, eps=1e-8, grad_clip=0.0, weight_decay=0.0, name="t")
    opt.step((param * NAN).sum())
    assert torch.equal(param.detach(), torch.ones(3))
    state = opt.adam.state[param]
    assert float(state["step"]) == 0.0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_apply_without_a_loss_judges_the_gradient_norm():
    param = torch.nn.Parameter(torch.ones(2))
    opt = Optimizer([param], lr=0.1, eps=1e-8, grad_clip=1.0, name="t")
    param.grad = torch.tensor([1.0, NAN])
    m = opt.apply()
    assert float(m["t/nonfinite"]) == 1.0 and torch.equal(param.detach(), torch.ones(2))


# ---- state outside the optimizers -----------------------------------------------------------


def test_slow_target_is_left_alone_when_the_critic_skipped():
    critic, target = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in target.parameters()]
    updates = torch.zeros((), dtype=torch.int64)
    cfg = ActorCriticConfig(slow_target_every=1, slow_target_fraction=0.5)
    assert update_slow_target(critic, target, updates, cfg, 0, skip=torch.tensor(1.0)) == 1  # would copy
    assert all(torch.equal(p, b) for p, b in zip(target.parameters(), before))
    update_slow_target(critic, target, updates, cfg, 1, skip=torch.tensor(0.0))  # mixes halfway
    for t, c, b in zip(target.parameters(), critic.parameters(), before):
        torch.testing.assert_close(t, 0.5 * (c + b))
    update_slow_target(critic, target, torch.zeros((), dtype=torch.int64), cfg, 0, skip=torch.tensor(0.0))
    assert all(torch.equal(t, c) for t, c in zip(target.parameters(), critic.parameters()))  # exact copy


def test_codebook_ignores_nonfinite_embeddings_and_skipped_updates():
    cfg = ChoreographerConfig(num_codes=4, code_dim=2, resample_every=1)
    sae = SkillAutoEncoder(3, cfg, units=8, layers=1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    z = torch.rand(6, 2)
    before = snapshot(sae)
    bad = z.clone()
    bad[2, 1] = NAN
    m = sae.codebook_step(bad, sae.nearest(bad), g)  # every step is a resampling check
    assert float(m["codebook/resampled_codes"]) == 0.0
    assert not differing(before, snapshot(sae))
    m = sae.codebook_step(z, sae.nearest(z), g, skip=torch.tensor(1.0))  # finite, but the update skipped
    assert not differing(before, snapshot(sae))
    m = sae.codebook_step(z, sae.nearest(z), g, skip=torch.tensor(0.0))
    assert "codebook" in {k.strip("/") for k in differing(before, snapshot(sae))}
    assert int(sae.updates) == 1 and all_finite(snapshot(sae))


def test_running_magnitude_keeps_its_value_on_a_nonfinite_batch():
    norm = RunningMagnitude(momentum=0.9)
    norm(torch.full((4,), 3.0))
    mag = norm.mag.clone()
    out = norm(torch.tensor([1.0, float("inf")]))
    assert torch.equal(norm.mag, mag) and not torch.isfinite(out).all()


# ---- the agent ------------------------------------------------------------------------------


def _agent(seed: int = 0) -> ChoreographerAgent:
    cfg = load_config(["tiny"], ["agent.choreographer.resample_every=1"]).agent  # a check every update
    return ChoreographerAgent((24,), 6, cfg, seed=seed, device="cpu")


def _batch(seed: int, reward: float = 0.0) -> dict:
    return random_batch(np.random.default_rng(seed), (24,), 3, 6, reward_scale=reward)


def _nan_obs(batch: dict) -> dict:
    batch = {k: v.copy() for k, v in batch.items()}
    batch[B.OBSERVATION][1, 2, 5] = NAN
    return batch


# What an update skipped from its first step may still change: the random generator's state
# (its draws happened) and the imagination actor-critics' call counters (their slow-target
# schedule is counted on the host, without a sync). Everything else must be bit-for-bit the same.
ALLOWED = {"/_extra_state/generator", "/explore_ac.updates", "/skill_ac.updates", "/meta.updates"}


@pytest.mark.parametrize("where", ["observation", "action", "reward"])
def test_pretrain_update_on_a_nan_in_the_batch_changes_nothing_and_reports_it(where):
    agent = _agent()
    agent.update(_batch(0))  # optimizer states exist
    before = snapshot(agent)
    batch = _nan_obs(_batch(1))
    if where == "action":  # NaN deterministic states: every loss after the world model's is NaN too
        batch = _batch(1)
        batch[B.ACTION][0, 3, 1] = NAN
    elif where == "reward":  # only the world model's reward head sees it
        batch = _batch(1)
        batch[B.REWARD][2, 4] = NAN
    metrics = agent.update(batch)
    assert metrics["learner/nonfinite"] == 1.0
    assert metrics["world_model/nonfinite"] == 1.0 and math.isnan(metrics["world_model/loss"])
    if where == "action":
        assert metrics["explore/actor/nonfinite"] == 1.0 and metrics["skill_ac/critic/nonfinite"] == 1.0
    after = snapshot(agent)
    assert all_finite(after)
    assert differing(before, after) <= ALLOWED
    assert int(agent.updates) == 1  # only the finite update counted

    metrics = agent.update(_batch(2))  # and training goes on
    assert metrics["learner/nonfinite"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    assert int(agent.updates) == 2


def test_finetune_update_on_nan_observations_changes_nothing():
    agent = _agent()
    agent.update(_batch(0))
    agent.finetune_mode()
    agent.update(_batch(1, reward=1.0))  # opens the reward gate: the meta-controller trains
    assert bool(agent.gate_open)
    before = snapshot(agent)
    metrics = agent.update(_nan_obs(_batch(2, reward=1.0)))
    assert metrics["learner/nonfinite"] == 1.0
    assert metrics["world_model/nonfinite"] == 1.0
    after = snapshot(agent)
    assert all_finite(after) and differing(before, after) <= ALLOWED


def test_steps_before_the_first_nonfinite_loss_stand_and_later_ones_are_skipped():
    agent = _agent()
    agent.update(_batch(0))
    names = ("wm", "lbs", "explore_ac", "explore_norm", "skills", "skill_ac")
    before = {name: snapshot(getattr(agent, name)) for name in names}
    agent.explore_ac.entropy_scale = float("inf")  # the exploration actor's loss is infinite
    metrics = agent.update(_batch(1))
    assert metrics["learner/nonfinite"] == 1.0 and metrics["explore/actor/nonfinite"] == 1.0
    assert metrics["world_model/nonfinite"] == 0.0 and metrics["codebook/nonfinite"] == 0.0
    changed = {name for name in names if differing(before[name], snapshot(getattr(agent, name))) - {"/updates"}}
    assert changed == {"wm", "lbs"}  # before it: stepped; from it on: skipped (magnitude restored)
    assert all_finite(snapshot(agent)) and int(agent.updates) == 1

    agent.explore_ac.entropy_scale = agent.cfg.actor_critic.actor_entropy
    before = snapshot(agent.skill_ac)
    agent.skill_ac.entropy_scale = float("nan")  # the last part only
    metrics = agent.update(_batch(2))
    assert metrics["skill_ac/actor/nonfinite"] == 1.0 and metrics["skill_ac/critic/nonfinite"] == 0.0
    assert not differing(before, snapshot(agent.skill_ac)) - {"/updates"}  # critic and target too
    assert all_finite(snapshot(agent))


# ---- the learner ----------------------------------------------------------------------------


class _ScriptedAgent:
    """Reports a non-finite update wherever the script says True."""

    def __init__(self, script):
        self.script = iter(script)

    def update(self, batch):
        bad = next(self.script)
        return {"world_model/loss": NAN if bad else 1.0, "learner/nonfinite": float(bad)}

    def policy_weights(self):
        return {}


def _learner(tmp_path, agent, limit: int, publish=None) -> Learner:
    cfg = dataclasses.replace(load_config(["tiny"]).learner, max_nonfinite_updates=limit, publish_every=1)
    return Learner(agent, lambda: {}, publish or (lambda w, v: None), cfg, tmp_path, prefetch=0)


def test_learner_stops_after_max_nonfinite_updates_in_a_row(tmp_path):
    published = []
    learner = _learner(tmp_path, _ScriptedAgent([False, True, True, False, True, True, True]), 3,
                       publish=lambda w, v: published.append(v))
    assert learner.step()["learner/skipped_updates"] == 0.0
    for expected in (1.0, 2.0):
        assert learner.step()["learner/skipped_updates"] == expected
    assert learner.updates == 1 and learner.version == 1 and learner.nonfinite_in_a_row == 2
    learner.step()  # a finite update resets the streak
    assert learner.nonfinite_in_a_row == 0 and learner.updates == 2
    learner.step()
    learner.step()
    with pytest.raises(NonFiniteLossError, match=r"^3 updates in a row were non-finite") as err:
        learner.step()
    message = str(err.value)
    assert "world_model/loss" in message and "learner.max_nonfinite_updates=3" in message
    assert "the last checkpoint was left intact" in message
    assert isinstance(err.value, RuntimeError)
    assert learner.skipped_updates == 5 and learner.updates == 2
    assert published == [1, 2]  # skipped updates neither advance the version nor publish


def test_learner_never_stops_with_the_limit_off(tmp_path):
    learner = _learner(tmp_path, _ScriptedAgent([True] * 50), 0)
    for _ in range(50):
        learner.step()
    assert learner.skipped_updates == 50 and learner.updates == 0


def test_learner_without_the_flag_judges_the_losses(tmp_path):
    class LossOnly:
        def update(self, batch):
            return {"critic/loss": float("inf"), "other": NAN}

        def policy_weights(self):
            return {}

    learner = _learner(tmp_path, LossOnly(), 2)
    learner.step()
    with pytest.raises(NonFiniteLossError, match="critic/loss"):
        learner.step()


def test_real_agent_run_stops_with_its_checkpoint_intact(tmp_path):
    batches = iter([_batch(0), _batch(1)] + [_nan_obs(_batch(i)) for i in range(2, 6)])
    cfg = dataclasses.replace(load_config(["tiny"]).learner, max_nonfinite_updates=3)
    learner = Learner(_agent(), lambda: next(batches), lambda w, v: None, cfg, tmp_path, prefetch=0)
    learner.step()
    learner.step()
    learner.save_checkpoint({"frames": 10})
    saved = (tmp_path / CHECKPOINT).read_bytes()
    learner.step()
    learner.step()
    with pytest.raises(NonFiniteLossError, match="3 updates in a row") as err:
        learner.step()
    assert "world_model/loss" in str(err.value)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved
    assert learner.updates == 2 and all_finite(snapshot(learner.agent))
