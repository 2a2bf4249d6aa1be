"""The DADS agent, learner side: one `update(batch)` trains skill dynamics and SAC (off-DADS).

Transitions: the batch holds sequences `[B, T, ...]` in the shared layout (choreo/vocabulary.py:
action[t] LED TO observation[t]) plus `skill_vector` and `behaviour_logp`. Transition t pairs
observation[t] with action[t+1], observation[t+1], discount[t+1], skill_vector[t+1] (the skill
held when action[t+1] was chosen) and behaviour_logp[t+1], for t = 0..T-2: B * (T - 1) of them.
A pair is left out (masked, no host synchronisation) where observation[t+1] starts an episode
(`is_first`: it does not follow observation[t]) or where action[t+1] was a random seed action
(`policy_version` -1: no skill chose it).

One update, in order:
    1. q (skill dynamics), on every `dynamics_every`-th update: `dynamics_steps` Adam steps on the
       whole batch, the likelihood weighted by off-DADS importance weights
       clip(pi_current(a|s,z) / pi_behaviour(a|s,z), 1/eps, eps) (`importance_clip`).
    2. The DADS reward of every transition, with the freshly updated q in evaluation mode
       (running statistics), L prior samples per transition (continuous skills) or all skills
       (discrete). Recomputed on every batch, never stored (as the reference).
    3. `sac_steps` SAC steps on the whole batch with that reward.

The policy and critics see the observation without its first `omit_coordinates` dims, the skill
concatenated last; q sees its own state space (see skill_dynamics.py).

NaN or infinite losses, as the Choreographer agent: from the first non-finite loss or gradient
norm on, the update's optimiser steps are skipped on the device (a running skip flag) and the
target critics do not move; q's running statistics never take a non-finite batch statistic. The
update reports `learner/nonfinite` = 1.0 then, and `updates` counts the fully finite updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from choreo import vocabulary as B
from choreo.agents.actor_critic import Optimizer, either
from choreo.agents.config import AgentConfig
from choreo.agents.dads.config import SHAPE_KEYS, DadsConfig
from choreo.agents.dads.rewards import alternative_skills, dads_reward, importance_weights
from choreo.agents.dads.sac import Sac
from choreo.agents.dads.skill_dynamics import SkillDynamics, dynamics_loss, masked_mean
from choreo.agents.timing import PartTimer

REQUIRED_KEYS = (B.OBSERVATION, B.ACTION, B.IS_FIRST, B.DISCOUNT, B.SKILL_VECTOR, B.BEHAVIOUR_LOGP)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def policy_input(observation: Tensor, skill: Tensor, cfg: DadsConfig) -> Tensor:
    """What the actor and critics see: `observation [..., O]` without its first `omit_coordinates`
    dims, the skill `[..., D]` concatenated last -> `[..., O - omit + D]`."""
    return torch.cat([observation[..., cfg.omit_coordinates:].float(), skill.float()], -1)


def check_config(obs_shape: tuple[int, ...], cfg: DadsConfig) -> None:
    """Refuse settings DADS cannot run with, naming the key."""
    if len(obs_shape) != 1:
        raise ValueError(f"DADS needs state observations [D]; got observations of shape {obs_shape} "
                         "(its skill dynamics does not model pixels)")
    if cfg.skill_type not in ("continuous", "discrete"):
        raise ValueError(f"agent.dads.skill_type {cfg.skill_type!r} is not 'continuous' or 'discrete'")
    if cfg.skill_dim < 1 or (cfg.skill_type == "discrete" and cfg.skill_dim < 2):
        raise ValueError(f"agent.dads.skill_dim {cfg.skill_dim} is too small")
    if cfg.skill_type == "continuous" and cfg.prior_samples < 1:
        raise ValueError(f"agent.dads.prior_samples must be at least 1, got {cfg.prior_samples}")
    if not 0 <= cfg.omit_coordinates < obs_shape[0]:
        raise ValueError(f"agent.dads.omit_coordinates {cfg.omit_coordinates} leaves no observation dims")
    for key in ("dynamics_steps", "dynamics_every", "sac_steps", "num_components", "hidden", "reward_chunk"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"agent.dads.{key} must be at least 1, got {getattr(cfg, key)}")


class DadsAgent(nn.Module):
    """Skill dynamics q, SAC (actor, twin critics, targets, temperature), their optimisers, the
    update counter and the random generator. `state_dict()` holds all of it (optimiser and
    generator states ride along as extra state), so `load_state_dict` on a fresh agent continues
    exactly; it loads with `torch.load(weights_only=True)`."""

    SHAPE_KEYS = SHAPE_KEYS
    """Keys of `AgentConfig` that decide the shapes of this agent's tensors (with the observation
    and action sizes); see `agents.registry.shape_keys`."""

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: AgentConfig, seed: int = 0,
                 device: str | torch.device | None = "auto", profile: bool = False) -> None:
        super().__init__()
        d = cfg.dads
        check_config(tuple(obs_shape), d)
        self.cfg = cfg
        self.obs_shape = tuple(obs_shape)
        self.action_dim = action_dim
        self.device = resolve_device(device)
        self.timer = PartTimer(self.device if profile else None)
        self.seed = seed
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed)
        obs_dim = self.obs_shape[0]
        # Parameter init draws from the global RNG; seed it locally and leave the caller's alone.
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(seed)
            self.dynamics = SkillDynamics(obs_dim, d.skill_dim, d)
            self.sac = Sac(obs_dim - d.omit_coordinates + d.skill_dim, action_dim, d)
        self.dynamics_opt = Optimizer(self.dynamics.parameters(), d.dynamics_lr, d.adam_eps, 0.0, name="dynamics")
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=self.device))
        self.to(self.device)

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        return {"dynamics_opt": self.dynamics_opt.state_dict(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.dynamics_opt.load_state_dict(state["dynamics_opt"])
        self.generator.set_state(state["generator"].cpu())

    # ------------------------------------------------------------------ updates

    def transitions(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The batch's B * (T - 1) transitions, flat, on the agent's device (module docstring):
        obs, next_obs [N, O]; action [N, A]; skill [N, D]; behaviour_logp, discount, mask [N]."""
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"a DADS batch needs {', '.join(missing)} (the skill vector and behaviour "
                           "log-probability that DadsPolicy.act reports in its extras)")

        def get(key: str) -> Tensor:
            v = batch[key]
            t = torch.from_numpy(np.asarray(v)) if not isinstance(v, Tensor) else v
            return t.to(self.device, non_blocking=True)

        obs = get(B.OBSERVATION)  # [B, T, O]
        first = get(B.IS_FIRST).bool()  # [B, T]
        valid = ~first[:, 1:]
        if B.POLICY_VERSION in batch:
            valid = valid & (get(B.POLICY_VERSION)[:, 1:] >= 0)
        valid = valid.flatten(0, 1)  # [N]

        def rows(t: Tensor) -> Tensor:
            # Left-out rows are zeroed: a reset row's skill or log-probability may hold anything,
            # and a NaN there would reach the gradients through 0 * NaN.
            t = t.float().flatten(0, 1)
            return torch.where(valid.view(-1, *[1] * (t.dim() - 1)), t, 0.0)

        return {
            "obs": rows(obs[:, :-1]),
            "next_obs": rows(obs[:, 1:]),
            "action": rows(get(B.ACTION)[:, 1:]),
            "skill": rows(get(B.SKILL_VECTOR)[:, 1:]),
            "behaviour_logp": rows(get(B.BEHAVIOUR_LOGP)[:, 1:]),
            "discount": rows(get(B.DISCOUNT)[:, 1:]),
            "mask": valid.float(),
        }

    def update(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One learner update on a batch `[B, T, ...]` (numpy or torch; keys from choreo.vocabulary,
        with `skill_vector` and `behaviour_logp`). Returns flat metrics as floats (one device sync
        at the end, one more to decide whether q trains on this update)."""
        d = self.cfg.dads
        self.timer.reset()
        x = self.transitions(batch)
        mask = x["mask"]
        inputs = policy_input(x["obs"], x["skill"], d)  # [N, I]
        next_inputs = policy_input(x["next_obs"], x["skill"], d)
        state, next_state = self.dynamics.project(x["obs"]), self.dynamics.project(x["next_obs"])  # [N, S]
        metrics: dict[str, Tensor] = {"dads/valid_fraction": mask.mean()}
        skip: Tensor | None = None

        if int(self.updates) % d.dynamics_every == 0:
            with self.timer("dynamics"):
                with torch.no_grad():
                    logp = self.sac.policy(inputs).log_prob(x["action"])  # [N]
                    weights = importance_weights(logp, x["behaviour_logp"], d.importance_clip)  # [N]
                    metrics["dynamics/importance_weight"] = masked_mean(weights, mask)
                    if d.importance_clip > 1.0:
                        clipped = (logp - x["behaviour_logp"]).abs() >= math.log(d.importance_clip)
                        metrics["dynamics/importance_clipped"] = masked_mean(clipped.float(), mask)
                        if d.normalize_weights:
                            weights = weights / metrics["dynamics/importance_weight"].clamp_min(1e-8)
                self.dynamics.train()
                for _ in range(d.dynamics_steps):
                    loss, m = dynamics_loss(self.dynamics, state, x["skill"], next_state, weights, mask)
                    metrics.update(m)
                    metrics.update(self.dynamics_opt.step(loss, skip))
                    skip = either(skip, metrics["dynamics/nonfinite"])

        with self.timer("reward"), torch.no_grad():
            self.dynamics.eval()
            alternatives = alternative_skills(x["skill"], d.skill_type, d.prior_samples, self.generator)
            reward, log_q = dads_reward(self.dynamics.log_prob, state, x["skill"], next_state, alternatives,
                                        d.reward_chunk)
            self.dynamics.train()
        metrics["dads/reward"] = masked_mean(reward, mask)
        metrics["dads/log_q"] = masked_mean(log_q, mask)

        with self.timer("sac"):
            for _ in range(d.sac_steps):
                m = self.sac.update(inputs, x["action"], reward, x["discount"], next_inputs, mask, self.generator,
                                    skip)
                metrics.update(m)
                skip = either(either(either(skip, m["sac/critic/nonfinite"]), m["sac/actor/nonfinite"]),
                              m["sac/alpha/nonfinite"])

        flags = [v for k, v in metrics.items() if k.endswith("/nonfinite")]
        nonfinite = torch.stack(flags).amax()
        metrics["learner/nonfinite"] = nonfinite
        self.updates.add_((nonfinite == 0).to(self.updates.dtype))
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                              for v in metrics.values()]).tolist()
        out = dict(zip(metrics, values))
        out.update(self.timer.metrics())
        return out

    # ------------------------------------------------------------------ acting weights

    def policy_weights(self) -> dict[str, np.ndarray]:
        """What acting needs, as numpy arrays: the actor (`actor.*`)."""
        return {f"actor.{name}": t.detach().to("cpu", torch.float32).numpy().copy()
                for name, t in self.sac.actor.state_dict().items()}

    def skill_dynamics_step(self, state: Tensor, skill: Tensor) -> Tensor:
        """One deterministic step of q for planning (`skill_model.DadsSkillModel`):
        `[..., S], [..., D] -> [..., S]`, in q's state space (see `self.dynamics.project`)."""
        with torch.no_grad():
            return self.dynamics.predict(state, skill)
