"""DADS as a skill model for zero-shot planning (`choreo.agents.planning.SkillModel`).

An environment's context is its observation. Skill dynamics q predicts a candidate plan with its
mixture mean (deterministic) in its own state space (`DadsConfig.dynamics_dims`, e.g. the x-y
coordinates, or the whole observation); the observation dims outside that space hold the start
observation's values. The SAC actor executes the chosen skill: a sample, or tanh(mean) in "mode".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from choreo.agents.dads.agent import DadsAgent, policy_input


class DadsSkillModel:
    """Continuous skills in [-1, 1]^D or D discrete one-hot skills, as `agent.cfg.dads` says."""

    def __init__(self, agent: DadsAgent) -> None:
        self.agent = agent
        self.cfg = agent.cfg.dads
        self.skill_type = self.cfg.skill_type
        self.skill_dim = self.cfg.skill_dim
        self.state_dims = tuple(agent.dynamics.state_dims)
        self.whole = self.state_dims == tuple(range(agent.obs_shape[0]))

    @property
    def device(self) -> torch.device:
        return next(self.agent.parameters()).device

    def initial_state(self, n: int) -> None:
        return None

    def observe(self, observation: Tensor, is_first: Tensor, state: None,
                generator: torch.Generator | None) -> tuple[Tensor, None]:
        """`[N, O]` -> (context [N, O] float32, model state)."""
        return observation.float(), None

    def imagine(self, start: Tensor, plans: Tensor, hold: int, generator: torch.Generator | None) -> Tensor:
        """Predicted observations `[M, K, H, O]` of plans `[M, K, H_P, D]` from the observations
        `start [M, O]`: each segment's skill held `hold` steps of q's mixture mean."""
        m, k = plans.shape[:2]
        state = self.agent.dynamics.project(start).unsqueeze(1).expand(m, k, -1)  # [M, K, S]
        states = []
        for i in range(plans.shape[2]):
            skill = plans[:, :, i]
            for _ in range(hold):
                state = self.agent.skill_dynamics_step(state, skill)
                states.append(state)
        predicted = torch.stack(states, 2)  # [M, K, H, S]
        if self.whole:
            return predicted
        out = start[:, None, None, :].expand(m, k, predicted.shape[2], -1).clone()
        out[..., list(self.state_dims)] = predicted
        return out

    def act(self, context: Tensor, state: None, skill: Tensor, sample: bool,
            generator: torch.Generator | None) -> tuple[Tensor, None]:
        """Actions `[N, A]` of the SAC actor for skills `[N, D]`, and the model state."""
        dist = self.agent.sac.policy(policy_input(context, skill, self.cfg))
        return (dist.sample(generator) if sample else dist.mode), None

    def acting_weights(self) -> dict[str, np.ndarray]:
        return self.agent.policy_weights()
