"""The DADS acting policy: what an environment worker runs.

It holds only the SAC actor. Every environment holds one skill for a whole episode: a skill drawn
from the prior (U(-1, 1)^D, or a uniform one-hot for discrete skills) at every episode start
(`is_first`), unless a skill was given to `initial_state` (or set on the policy, `DadsPolicy(...,
skill=...)` or `set_skills(...)`, for callers that make states with `initial_state(n)` alone, such
as the EnvRunner), which is then held across episodes.
Planning in skill space (`choreo.agents.planning`, with `dads.skill_model`) executes its skills with
the same actor, from the learner-side agent.

Behaviours: DADS has one acting policy, the skill-conditioned actor; "explore", "skill" and "meta"
(the names the launcher asks for when pretraining, looking at a skill, fine-tuning or
evaluating) all run it. Modes: "sample" (training) draws the action from the squashed Gaussian,
"mode" (evaluation) takes tanh(mean); with given skills, acting in "mode" draws nothing at all.

`act`'s extras: "skill" [N] int32 (the discrete skill's index, -1 for continuous skills),
"skill_vector" [N, D] float32 (the skill that conditioned the action) and "behaviour_logp" [N]
float32 (log pi(action | observation, skill) of the returned action, what off-DADS's importance
weights divide by; `SquashedNormal.log_prob`, as the learner recomputes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from choreo import vocabulary as B
from choreo.agents.config import AgentConfig
from choreo.agents.dads.agent import check_config, policy_input
from choreo.agents.dads.rewards import sample_prior
from choreo.agents.dads.sac import SquashedNormal, build_actor
from choreo.agents.nets import load_acting_weights

BEHAVIOURS = ("explore", "skill", "meta")
Skills = int | Sequence[float] | Sequence[int] | np.ndarray | Tensor
"""A skill for every environment (a vector `[D]`, or a discrete skill's index) or one per
environment (vectors `[N, D]`, or indices `[N]` of discrete skills)."""


@dataclass
class DadsPolicyState:
    """Per-environment state `[N, ...]`."""

    skill_vector: Tensor  # [N, D] float32, the skill held in the current episode
    fixed: Tensor  # [N] bool, a given skill: kept at episode starts


class DadsPolicy(nn.Module):
    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: AgentConfig,
                 behaviour: str = "explore", seed: int = 0, skill: Skills | None = None) -> None:
        """skill: what `initial_state(n)` gives when called without a skill (see `set_skills`)."""
        super().__init__()
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; valid: {', '.join(BEHAVIOURS)}")
        d = cfg.dads
        check_config(tuple(obs_shape), d)
        self.cfg = cfg
        self.behaviour = behaviour
        self.obs_shape = tuple(obs_shape)
        self.action_dim = action_dim
        self.skill_dim = d.skill_dim
        self.discrete = d.skill_type == "discrete"
        self.version = -1
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = build_actor(self.obs_shape[0] - d.omit_coordinates + d.skill_dim, action_dim, d)
        self.requires_grad_(False)
        self.skills: Tensor | None = None
        """The skill vectors set with `set_skills` (`[D]` or `[N, D]`), or None: drawn from the prior."""
        if skill is not None:
            self.set_skills(skill)

    @property
    def step_keys(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Extras of `act` that the environment workers store with every step: the skill held and
        the behaviour log-probability of the action (off-DADS importance weights)."""
        return {B.SKILL_VECTOR: ((self.skill_dim,), np.float32), B.BEHAVIOUR_LOGP: ((), np.float32)}

    # ------------------------------------------------------------------ weights

    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes that `load_weights` requires, exactly."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def load_weights(self, arrays: dict[str, np.ndarray], version: int) -> None:
        """Load the learner's acting weights strictly: every name present, none extra, same shapes."""
        load_acting_weights(self, arrays)
        self.version = int(version)

    # ------------------------------------------------------------------ acting

    def set_skills(self, skill: Skills | None) -> None:
        """What `initial_state(n)` gives when called without a skill: a skill for every
        environment or one per environment (then `n` must be N), as `initial_state` takes them;
        None goes back to drawing skills from the prior. A state already made keeps its skills."""
        self.skills = None if skill is None else self._vectors(skill)

    def _vectors(self, skill: Skills) -> Tensor:
        """`skill` as float32 vectors `[D]` or `[N, D]`, checked (indices of discrete skills made one-hot)."""
        array = skill.detach().cpu().numpy() if isinstance(skill, Tensor) else np.asarray(skill)
        if array.dtype.kind in "iu" and self.discrete:  # indices
            if array.ndim > 1:
                raise ValueError(f"discrete skills are an index, or one per environment [N]; got shape {array.shape}")
            outside = array[(array < 0) | (array >= self.skill_dim)]
            if outside.size:
                raise ValueError(f"skill {int(outside.reshape(-1)[0])} is out of range 0..{self.skill_dim - 1}")
            return torch.nn.functional.one_hot(torch.as_tensor(array, dtype=torch.int64), self.skill_dim).float()
        if array.dtype.kind not in "fiu":
            raise ValueError(f"skills are vectors of {self.skill_dim} numbers, got {array.dtype} values")
        if array.ndim not in (1, 2) or array.shape[-1] != self.skill_dim:
            raise ValueError(f"skill of shape {array.shape}; expected ({self.skill_dim},) or (N, {self.skill_dim})")
        if not np.isfinite(array).all():
            raise ValueError("skills must be finite")
        return torch.as_tensor(array.astype(np.float32))

    def initial_state(self, n: int, skill: Skills | None = None) -> DadsPolicyState:
        """State of n environments. skill: the skill every environment holds throughout: a vector
        `[D]` or one per environment `[n, D]`, or for discrete skills an index or `[n]` indices;
        None: the skills set with `set_skills` if any, else a skill per environment drawn from the
        prior (and again at every episode start)."""
        vector = self._vectors(skill) if skill is not None else self.skills
        if vector is None:
            vector = sample_prior((n,), self.skill_dim, self.cfg.dads.skill_type, self.generator)
            return DadsPolicyState(vector, torch.zeros(n, dtype=torch.bool))
        if vector.shape not in ((self.skill_dim,), (n, self.skill_dim)):
            raise ValueError(f"skill of shape {tuple(vector.shape)} for {n} environments; expected "
                             f"({self.skill_dim},) or ({n}, {self.skill_dim})")
        return DadsPolicyState(vector.expand(n, self.skill_dim).clone(), torch.ones(n, dtype=torch.bool))

    @torch.inference_mode()
    def act(self, observation: np.ndarray, is_first: np.ndarray, state: DadsPolicyState,
            mode: Literal["sample", "mode"] = "sample") -> tuple[np.ndarray, DadsPolicyState, dict[str, np.ndarray]]:
        """`observation [N, O]`, `is_first [N]` -> (action [N, A] float32 in (-1, 1), new state,
        extras {"skill" [N] int32, "skill_vector" [N, D] float32, "behaviour_logp" [N] float32})."""
        obs = torch.as_tensor(np.asarray(observation), dtype=torch.float32)
        first = torch.as_tensor(np.asarray(is_first), dtype=torch.bool)
        skill = state.skill_vector
        redraw = first & ~state.fixed
        if bool(redraw.any()):
            fresh = sample_prior((len(obs),), self.skill_dim, self.cfg.dads.skill_type, self.generator)
            skill = torch.where(redraw.unsqueeze(-1), fresh, skill)
        d = self.cfg.dads
        dist = SquashedNormal.from_output(self.actor(policy_input(obs, skill, d)), d.log_std_min, d.log_std_max)
        action = dist.sample(self.generator) if mode == "sample" else dist.mode
        logp = dist.log_prob(action)
        index = skill.argmax(-1).to(torch.int32) if self.discrete else torch.full((len(obs),), -1, dtype=torch.int32)
        extras = {"skill": index.numpy(), "skill_vector": skill.numpy().astype(np.float32),
                  "behaviour_logp": logp.numpy().astype(np.float32)}
        return action.numpy().astype(np.float32), DadsPolicyState(skill, state.fixed), extras
