"""The Choreographer acting policy: what an environment worker runs.

It holds only what acting needs (the encoder, the RSSM and the three actors) and filters
observations into model states with the posterior, one batched call for all of a worker's
environments. Behaviours:
    explore  pretraining: the LBS exploration actor.
    skill    the skill actor with codes the caller chose, held for good (across episodes): one
             code for all environments or one per environment, given to `initial_state(n,
             skill=...)`, or set once on the policy (`ChoreographerPolicy(..., skill=...)` or
             `set_skills(...)`) for callers that make states with `initial_state(n)` alone, such
             as the EnvRunner. A skill policy without codes refuses to make a state (ValueError).
    meta     fine-tuning: once the reward gate is open, the meta-controller draws a code at every
             step (the reference's skill_len = 1); before that, a random code is held for
             `random_skill_every` steps (and redrawn at every episode start), so that the
             pretrained skills explore the task consistently until a reward is found.
Modes: "sample" (training) draws from the distributions: the posterior latent, the action and the
meta-controller's code. "mode" (evaluation) takes the mean action and the most likely code, and
the latent that `agent.choreographer.eval_latent` names: by default the one-hot argmax of each
latent categorical, so that acting draws nothing from the policy's generator except the meta
behaviour's random codes before the gate opens, and the explore and skill behaviours act as a
deterministic function of the observations; with `sample` a draw, as the reference evaluates. The recurrent state of an
environment is reset where `is_first` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from choreo.agents.config import AgentConfig
from choreo.agents.distributions import CodeCategorical, TruncatedNormal
from choreo.agents.nets import MLP, load_acting_weights
from choreo.agents.world_model import RSSM, State, build_encoder, preprocess_observation

Behaviour = Literal["explore", "skill", "meta"]
BEHAVIOURS = ("explore", "skill", "meta")
Skills = int | Sequence[int] | np.ndarray | Tensor
"""Skill codes: one integer for every environment, or one per environment `[N]`."""


@dataclass
class PolicyState:
    """Per-environment recurrent state `[N, ...]`."""

    latent: State
    prev_action: Tensor  # [N, A], the action that led to the current observation
    skill: Tensor  # [N] int64, the code conditioning the skill actor (-1: none)
    skill_steps: Tensor  # [N] int64, steps the current code has been held


class ChoreographerPolicy(nn.Module):
    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: AgentConfig,
                 behaviour: Behaviour = "explore", seed: int = 0, skill: Skills | None = None) -> None:
        """skill: the codes `initial_state(n)` gives when called without any (see `set_skills`)."""
        super().__init__()
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; valid: {', '.join(BEHAVIOURS)}")
        self.cfg = cfg
        self.behaviour = behaviour
        self.obs_shape = tuple(obs_shape)
        self.action_dim = action_dim
        self.version = -1
        wm, ac, ch = cfg.world_model, cfg.actor_critic, cfg.choreographer
        self.num_codes = ch.num_codes
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = build_encoder(self.obs_shape, wm)
            self.rssm = RSSM(self.encoder.out_dim, action_dim, wm)
            feat = self.rssm.feat_dim
            self.explore_actor = MLP(feat, 2 * action_dim, ac.units, ac.layers, norm=False)
            self.skill_actor = MLP(feat + ch.num_codes, 2 * action_dim, ac.units, ac.layers, norm=False)
            self.meta_actor = MLP(feat, ch.num_codes, ac.units, ac.layers, norm=False)
        self.register_buffer("gate_open", torch.zeros((), dtype=torch.bool))
        self.requires_grad_(False)
        self.skills: Tensor | None = None
        """The codes set with `set_skills` (`[]` for all environments or `[N]`), or None."""
        if skill is not None:
            self.set_skills(skill)

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
        """The codes that `initial_state(n)` gives when it is called without any: one code for
        every environment, or one per environment `[N]` (then `n` must be N); None forgets them.
        A state already made keeps its codes: set them before the caller makes its states (an
        EnvRunner makes its state when it is built and after its random seed steps)."""
        self.skills = None if skill is None else self._codes(skill)

    def _codes(self, skill: Skills) -> Tensor:
        """`skill` as int64 codes, `[]` or `[N]`, checked: integers in 0..num_codes - 1."""
        codes = skill.detach().cpu() if isinstance(skill, Tensor) else torch.as_tensor(np.asarray(skill))
        if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"skills are integer codes in 0..{self.num_codes - 1}, got {codes.dtype} values")
        if codes.dim() > 1:
            raise ValueError(f"skills are one code, or one per environment [N]; got shape {tuple(codes.shape)}")
        outside = codes[(codes < 0) | (codes >= self.num_codes)]
        if len(outside.reshape(-1)):
            raise ValueError(f"skill {int(outside.reshape(-1)[0])} is out of range 0..{self.num_codes - 1} "
                             f"(the codebook has {self.num_codes} codes)")
        return codes.to(torch.int64).clone()

    def initial_state(self, n: int, skill: Skills | None = None) -> PolicyState:
        """The state of n environments at their start. skill: the code of each environment (one
        for all, or `[n]`); without it the codes set with `set_skills` (or at construction). The
        skill behaviour needs codes (ValueError without any); explore ignores them and meta
        draws its own at the first step."""
        codes = self._codes(skill) if skill is not None else self.skills
        if codes is not None and codes.dim() == 1 and len(codes) != n:
            raise ValueError(f"{len(codes)} skills for {n} environments: give one code, or one per environment")
        if codes is None or self.behaviour == "explore":
            if self.behaviour == "skill":
                raise ValueError("the skill behaviour runs the skills you choose: give them, "
                                 "initial_state(n, skill=k) with one code k for all environments or an "
                                 "array of n codes, or set them once with set_skills(...) or "
                                 "ChoreographerPolicy(..., skill=...)")
            codes = torch.tensor(-1)  # no code conditions the action
        return PolicyState(
            latent=self.rssm.initial(n),
            prev_action=torch.zeros(n, self.action_dim),
            skill=codes.expand(n).clone(),
            skill_steps=torch.zeros(n, dtype=torch.int64),
        )

    @torch.inference_mode()
    def act(self, observation: np.ndarray, is_first: np.ndarray, state: PolicyState,
            mode: Literal["sample", "mode"] = "sample") -> tuple[np.ndarray, PolicyState, dict[str, np.ndarray]]:
        """`observation [N, *obs_shape]`, `is_first [N]` -> (action [N, A] float32 in [-1, 1],
        new state, extras {"skill": [N] int32 code that conditioned the action, -1 for none})."""
        if mode not in ("sample", "mode"):
            raise ValueError(f"unknown mode {mode!r}; valid: sample, mode")
        sample = mode == "sample"
        obs = torch.as_tensor(observation)
        first = torch.as_tensor(is_first, dtype=torch.bool)
        embed = self.encoder(preprocess_observation(obs, pixels=len(self.obs_shape) == 3))
        latent = self.rssm.posterior_step(state.latent, state.prev_action, embed, first, self.generator,
                                          sample=sample or self.cfg.choreographer.eval_latent == "sample")
        feat = self.rssm.feature(latent)

        skill, steps = state.skill, state.skill_steps
        if self.behaviour == "explore":
            dist = TruncatedNormal.from_output(self.explore_actor(feat), self.cfg.actor_critic.actor_min_std)
        else:
            if self.behaviour == "meta":
                skill, steps = self._choose_skill(feat, first, skill, steps, sample)
            code = F.one_hot(skill.clamp_min(0), self.num_codes).to(feat.dtype)
            dist = TruncatedNormal.from_output(self.skill_actor(torch.cat([feat, code], -1)),
                                               self.cfg.actor_critic.actor_min_std)
            steps = steps + 1
        action = dist.sample(self.generator) if sample else dist.mode
        new_state = PolicyState(latent, action, skill, steps)
        return action.numpy().astype(np.float32), new_state, {"skill": skill.numpy().astype(np.int32)}

    def _choose_skill(self, feat: Tensor, first: Tensor, skill: Tensor, steps: Tensor,
                      sample: bool) -> tuple[Tensor, Tensor]:
        if bool(self.gate_open):
            dist = CodeCategorical(self.meta_actor(feat))
            chosen = dist.sample_index(self.generator) if sample else dist.mode.argmax(-1)
            return chosen, torch.zeros_like(steps)
        redraw = first | (skill < 0) | (steps >= self.cfg.choreographer.random_skill_every)
        fresh = torch.randint(self.num_codes, skill.shape, generator=self.generator)
        return torch.where(redraw, fresh, skill), torch.where(redraw, torch.zeros_like(steps), steps)
