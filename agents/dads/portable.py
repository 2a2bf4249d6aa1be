"""The DADS acting policy with a given skill as a module that needs only torch: `torch.jit.script`
compiles it, and the file `torch.jit.save` writes runs with `torch.jit.load` alone (`choreo
export-policy`).

It acts as `DadsPolicy.act` in mode "mode" with the skill held: the action is tanh of the SAC
actor's mean, given the observation without its first `omit_coordinates` dims and the skill.
DADS has no other acting policy (no exploration actor, no meta-controller); a skill drawn from
the prior at each episode start is random, which nothing deterministic reproduces, so the skill is
always given.

`initial_state(B)` is B environments at an episode start; the state is a dict of tensors with one
row per environment:
    skill  [B, D] float32, the skill vector conditioning the actor (the exported skill in every row
           of the initial state; set a row to act with another skill in that environment)
"""

# No `from __future__ import annotations`: TorchScript reads the class-level `Final` annotations
# as objects, not strings.
import copy
from collections.abc import Mapping
from typing import Final

import torch
from torch import Tensor, nn

from choreo.agents.dads.policy import DadsPolicy


class PortableDadsPolicy(nn.Module):
    """`initial_state(batch_size) -> state`, `step(observation [B, O], state) -> (action [B, A]
    float32 in (-1, 1), state)`; `metadata` describes both, with `about`'s entries."""

    omit_coordinates: Final[int]
    observation_shape: list[int]
    action_dim: int
    metadata: dict[str, str]

    def __init__(self, policy: DadsPolicy, about: Mapping[str, str] | None = None) -> None:
        """A copy of `policy`'s actor (it loaded its weights already) with the one skill set on it
        for every environment (`set_skills(...)`, a vector `[D]` or a discrete skill's index);
        ValueError without one."""
        super().__init__()
        if policy.skills is None or policy.skills.dim() != 1:
            raise ValueError("a portable DADS policy holds one skill for every environment: give the policy one, "
                             "set_skills(vector) or set_skills(index) for discrete skills")
        self.omit_coordinates = policy.cfg.dads.omit_coordinates
        self.actor = copy.deepcopy(policy.actor.net)
        self.register_buffer("skill", policy.skills.clone().to(torch.float32))
        self.requires_grad_(False)
        self.observation_shape = list(policy.obs_shape)
        self.action_dim = policy.action_dim
        self.metadata = {**describe(policy), **dict(about or {})}

    @torch.jit.export
    def initial_state(self, batch_size: int) -> dict[str, Tensor]:
        """The state of `batch_size` environments at an episode start (see the module docstring)."""
        return {"skill": self.skill.expand(batch_size, self.skill.shape[0]).clone()}

    @torch.jit.export
    def step(self, observation: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """`observation [B, O]` float32 states and the state of the previous step (or
        `initial_state(B)`) -> (action [B, A] float32 in (-1, 1), the same state)."""
        if observation.dim() != 2 or observation.shape[1] != self.observation_shape[0]:
            raise ValueError(f"observation of shape {observation.shape}; this policy takes [B] + "
                             f"{self.observation_shape} (a batch of B observations)")
        skill = state["skill"]
        if skill.shape[0] != observation.shape[0]:
            raise ValueError(f"a state of {skill.shape[0]} environments for {observation.shape[0]} observations: make "
                             f"it with initial_state({observation.shape[0]})")
        with torch.no_grad():
            inputs = torch.cat([observation[:, self.omit_coordinates:].float(), skill.float()], -1)
            action = torch.tanh(self.actor(inputs).float().chunk(2, -1)[0])
        return action, {"skill": skill}

    def forward(self, observation: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.step(observation, state)


def describe(policy: DadsPolicy) -> dict[str, str]:
    """What a user of the exported file needs to feed it, in words."""
    skill = ", ".join(f"{v:g}" for v in policy.skills.tolist())
    kind = policy.cfg.dads.skill_type
    if policy.discrete:
        held = f"the discrete skill {int(policy.skills.argmax())} of {policy.skill_dim} (one-hot [{skill}])"
    else:
        held = f"the continuous skill [{skill}] (the prior draws skills from U(-1, 1)^{policy.skill_dim})"
    return {
        "behaviour": "skill",
        "skill": skill,
        "policy": f"the SAC actor holding {held}; deterministic: tanh of the actor's mean",
        "observation": f"[B, {policy.obs_shape[0]}] float32 states (the first {policy.cfg.dads.omit_coordinates} "
                       f"dims are not seen by the actor)",
        "action": f"[B, {policy.action_dim}] float32 in (-1, 1) (the task's action bounds mapped onto [-1, 1])",
        "state": f"dict of tensors, one row per environment: skill [B, {policy.skill_dim}] float32 ({kind} "
                 f"skills); initial_state(B) at every episode start",
    }
