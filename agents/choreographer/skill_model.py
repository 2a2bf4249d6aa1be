"""Choreographer as a skill model for zero-shot planning (`choreo.agents.planning.SkillModel`).

The skills are the codebook's codes. An environment's context is its posterior RSSM state,
filtered as `ChoreographerPolicy` filters it. A candidate plan is imagined in the world model with
the skill actor's mean action conditioned on each segment's code and decoded to observations, in
the decoder's units: state observations as they are, pixels as float images scaled to
[-0.5, 0.5] (M * K * H * C * 64 * 64 floats: keep K and H small). The skill actor executes the
chosen code.

imagination: "mode" (default) takes the most likely latent of each prior step, so that a plan's
prediction is deterministic and the filtering takes the posterior's mode as `ChoreographerPolicy`
does in "mode"; "sample" samples the latents, as the skill actor's training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.world_model import State


@dataclass
class LatentState:
    """Per-environment model state `[N, ...]`, as ChoreographerPolicy's."""

    latent: State
    """The posterior state of the latest observation (after `observe`), or of the one before."""
    prev_action: Tensor
    """[N, A] the action that led to the next observation."""


class CodebookSkillModel:
    """Discrete skills: the agent's `num_codes` codes, planned as one-hot vectors."""

    def __init__(self, agent: ChoreographerAgent, imagination: Literal["mode", "sample"] = "mode") -> None:
        if imagination not in ("mode", "sample"):
            raise ValueError(f"imagination must be 'mode' or 'sample', got {imagination!r}")
        self.agent = agent
        self.imagination = imagination
        self.skill_type = "discrete"
        self.skill_dim = agent.cfg.choreographer.num_codes

    @property
    def device(self) -> torch.device:
        return next(self.agent.parameters()).device

    def initial_state(self, n: int) -> LatentState:
        device = self.device
        return LatentState(self.agent.wm.rssm.initial(n, device), torch.zeros(n, self.agent.action_dim, device=device))

    def observe(self, observation: Tensor, is_first: Tensor, state: LatentState,
                generator: torch.Generator | None) -> tuple[State, LatentState]:
        """Filter `observation [N, *obs_shape]` into the posterior; the state is reset where
        `is_first [N]` is set. Returns (context: the posterior `[N]`, model state)."""
        wm = self.agent.wm
        # Deterministic with deterministic imagination: the latent's mode, as the skill policy in "mode".
        latent = wm.rssm.posterior_step(state.latent, state.prev_action, wm.encode(observation), is_first, generator,
                                        sample=self.imagination == "sample")
        return latent, LatentState(latent, state.prev_action)

    def imagine(self, start: State, plans: Tensor, hold: int, generator: torch.Generator | None) -> Tensor:
        """Decoded observations `[M, K, H, *obs_shape]` of plans `[M, K, H_P, C]` (one-hot codes),
        imagined from the posteriors `start [M]`, batched over M * K."""
        wm, actor = self.agent.wm, self.agent.skill_ac
        rssm = wm.rssm
        m, k, horizon, num_codes = plans.shape
        state = start.map(lambda t: t.repeat_interleave(k, 0))  # [M * K], environment-major
        feat = rssm.feature(state)
        feats = []
        for i in range(horizon):
            code = plans[:, :, i].reshape(m * k, num_codes)
            for _ in range(hold):
                action = actor.policy(feat, code).mode
                state = rssm.img_step(state, action, generator)
                if self.imagination == "mode":
                    state = State(state.deter, F.one_hot(state.logits.argmax(-1), rssm.classes).to(state.deter),
                                  state.logits)
                feat = rssm.feature(state)
                feats.append(feat)
        observations = wm.decoder(torch.stack(feats, 1))  # [M * K, H, *obs_shape]
        return observations.reshape(m, k, *observations.shape[1:])

    def act(self, context: State, state: LatentState, skill: Tensor, sample: bool,
            generator: torch.Generator | None) -> tuple[Tensor, LatentState]:
        """Actions `[N, A]` of the skill actor conditioned on one-hot codes `[N, C]`, and the model
        state that remembers them for the next filtering step."""
        dist = self.agent.skill_ac.policy(self.agent.wm.rssm.feature(context), skill)
        action = dist.sample(generator) if sample else dist.mode
        return action, LatentState(state.latent, action)

    def acting_weights(self) -> dict[str, np.ndarray]:
        return self.agent.policy_weights()
