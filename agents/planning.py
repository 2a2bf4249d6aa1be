"""Zero-shot model-predictive control over sequences of skills, as acting policies (DADS paper
Sec. 4, Algorithm 2 and App. A.5; reference brief sections 3 and 7(b)). Nothing is trained at test
time: a task reward, given by the caller, is computed on the observations a model PREDICTS for each
candidate plan of skills, and the algorithm's skill actor executes the chosen skill.

One MPPI over one small interface, `SkillModel`, that each algorithm implements:
    DadsSkillModel      (agents/dads/skill_model.py) skills continuous in [-1, 1]^D or D discrete
                        ones; each candidate rolled forward with skill dynamics q's mixture mean.
    CodebookSkillModel  (agents/choreographer/skill_model.py) Choreographer's codes; each candidate
                        imagined in the world model with the skill actor conditioned on its codes,
                        decoded to observations.

Policies (the acting interface of every worker: `initial_state(n)`, `act(observation,
is_first, state, mode) -> (action [N, A] float32, state, extras {"skill": [N] int32})`,
`load_weights`, `version`):
    PlanningPolicy          MPPI over the skills of any SkillModel.
    DadsPlanningPolicy      PlanningPolicy over a DadsAgent's skill model.
    CodebookPlanningPolicy  PlanningPolicy over a ChoreographerAgent's skill model.
    RandomSkillPolicy       the baseline: a skill drawn from the prior (continuous: U(-1, 1)^D;
                            discrete skills and codes: a uniform one-hot), by the same executor.
All of them hold a skill for H_Z = `PlannerConfig.hold` agent steps per environment and choose a
new one when an environment's skill has been held H_Z steps or the environment starts an episode
(`is_first`); between those steps the skill stays. They take the learner-side agent (loaded from a
snapshot by the caller), not acting weights: planning needs q or the world model's decoder. Their
settings default to the agent's `cfg.planner` (the run config's `agent.planner`).

The reward contract (`RewardFn`):

    reward_fn(observations [M, K, H, *obs_shape], env [M] int64) -> rewards [M, K, H]

`observations[m, k, t]` is the observation predicted t + 1 steps after the current one of
environment `env[m]` under candidate plan k (the current observation itself is not scored);
H = H_P * H_Z (segment i of a plan covers t in [i * H_Z, (i + 1) * H_Z)). `env` holds the indices
(into the N environments of `act`) of the M <= N environments that choose a skill at this step,
so that per-environment goals bind as `goals[env]` (e.g. navigation:
`-(observations[..., :2] - goals[env][:, None, None]).norm(dim=-1)`). A plan's return is the sum
of its H rewards; MPPI weighs plans by softmax(gamma * (return - max return)), so gamma depends on
the reward's scale. A non-finite return (a model or a reward that diverged) counts as the worst
one: such a plan gets no weight while any plan's return is finite. The function is called once per
refinement iteration, on all M * K candidates at once, on the agent's device, under
`torch.inference_mode()`.

What the observations are:
- DADS: q rolls its own state space forward (`DadsConfig.dynamics_dims`, e.g. the x-y
  coordinates, or the whole observation); the observation dims outside it hold the current
  observation's values.
- Choreographer: the world model's decoder of each imagined state, in the decoder's units: state
  observations as they are; pixels as float images scaled to [-0.5, 0.5] (then the candidates'
  images take M * K * H * C * 64 * 64 floats: keep K and H small).

Planning, over M environments at once: every model call takes all M * K candidates; the loops run
over refinement iterations and model steps only, never over candidates or environments.
- Continuous skills (`mppi_continuous`): per environment and segment a Gaussian N(mu_i, variance
  I); each iteration samples K plans, clips them to the prior's support [-1, 1], optionally smooths
  them (z_i <- beta z_{i-1} + (1 - beta) z_i), and sets mu_i = sum_k w_k z_{k,i} with
  w = softmax(gamma (R - max R)). The skill to execute is mu_1 (the reference's expected
  primitive). mu starts at the prior's centre 0, or with `PlannerConfig.initial_mean="random"` at
  a draw from N(0, I) with the policy's generator (the reference's eval_mppi).
- Discrete skills and codes (`mppi_discrete`): a categorical per environment and segment, starting
  uniform, refined as p_i <- mix * sum_k w_k 1[z_{k,i} = c] + (1 - mix) * p_i; plans reach the
  model as one-hot vectors. The skill to execute is the most likely code of the first segment.
  With `exhaustive` (default) and when there are at most K plans (num_codes ** H_P <= K, e.g. 64
  codes with H_P = 1 and K = 64), every plan is scored once instead and the best one executed (the
  reference's `eval_planning`, with H_Z-step rollouts).
- Warm start (`shift`): after each plan the executed segment is dropped and a fresh one (the
  prior's centre or a fresh N(0, I) draw, as `initial_mean` says; or uniform) appended; a new
  episode restarts from the prior.
- Model rollouts are deterministic: q's mixture mean; in the world model the skill actor's mean
  action and (by default) the most likely latent of each prior step (`imagination="sample"`
  samples the latents, as the skill actor's training did). The executor acts with its mean action
  in mode "mode" and samples in mode "sample"; `choreo plan` acts in the mode that
  `PlannerConfig.execute` names (`execution_mode`: sampled actions by default, as the reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.skill_model import CodebookSkillModel
from choreo.agents.config import PlannerConfig
from choreo.agents.dads.agent import DadsAgent
from choreo.agents.dads.rewards import sample_prior
from choreo.agents.dads.skill_model import DadsSkillModel

RewardFn = Callable[[Tensor, Tensor], Tensor]
"""reward_fn(observations [M, K, H, *obs_shape], env [M] int64) -> rewards [M, K, H]; see the
module docstring."""
ReturnsFn = Callable[[Tensor], Tensor]
"""returns_fn(plans [M, K, H_P, D]) -> returns [M, K]: the predicted return of each candidate."""

MODES = ("sample", "mode")


def execution_mode(cfg: PlannerConfig) -> Literal["sample", "mode"]:
    """The acting mode (`act`'s `mode`) that executes the planned skills as `cfg.execute` says:
    "sample" draws the skill policy's actions, "mode" takes its mean action."""
    return "sample" if cfg.execute == "sample" else "mode"


class SkillModel(Protocol):
    """What planning needs of an algorithm. N environments act; a plan is made for M of them at
    a time, K candidate plans each. The context of an environment is whatever the model predicts
    from (an observation, a posterior state); contexts index like tensors along environments."""

    skill_type: Literal["continuous", "discrete"]
    """Continuous skills in [-1, 1]^D, or D discrete ones planned as one-hot vectors."""
    skill_dim: int
    """D: the skill vector's size, or the number of discrete skills (codes)."""

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live."""
        ...

    def initial_state(self, n: int) -> Any:
        """The model's recurrent state of n environments (None when it has none)."""
        ...

    def observe(self, observation: Tensor, is_first: Tensor, state: Any,
                generator: torch.Generator | None) -> tuple[Any, Any]:
        """`observation [N, *obs_shape]`, `is_first [N]` -> (contexts [N], model state)."""
        ...

    def imagine(self, start: Any, plans: Tensor, hold: int, generator: torch.Generator | None) -> Tensor:
        """Predicted observations `[M, K, H_P * hold, *obs_shape]` of `plans [M, K, H_P, D]` from
        the contexts `start [M]`, each segment's skill held `hold` model steps."""
        ...

    def act(self, context: Any, state: Any, skill: Tensor, sample: bool,
            generator: torch.Generator | None) -> tuple[Tensor, Any]:
        """The executor's actions `[N, A]` for `skill [N, D]` (sampled, or its mean action), and
        the model state after acting."""
        ...

    def acting_weights(self) -> dict[str, np.ndarray]:
        """The agent's acting weights (`agent.policy_weights()`), to recognise them in `load_weights`."""
        ...


def skill_model(agent: Any, **kwargs: Any) -> SkillModel:
    """The skill model of a learner-side agent (DadsAgent or ChoreographerAgent); kwargs go to the
    model (Choreographer: `imagination`)."""
    if isinstance(agent, DadsAgent):
        return DadsSkillModel(agent, **kwargs)
    if isinstance(agent, ChoreographerAgent):
        return CodebookSkillModel(agent, **kwargs)
    raise TypeError(f"planning needs a DadsAgent or a ChoreographerAgent, got {type(agent).__name__}")


# ----------------------------------------------------------------------------- MPPI


def _weights(returns: Tensor, gamma: float) -> Tensor:
    """MPPI weights softmax(gamma (R - max R)) over the candidates: `[M, K] -> [M, K]`. A
    non-finite return (a model or reward that diverged) counts as the worst possible one."""
    returns = torch.where(torch.isfinite(returns), returns, torch.finfo(returns.dtype).min)
    return torch.softmax(gamma * (returns - returns.amax(-1, keepdim=True)), -1)


def _best(returns: Tensor) -> Tensor:
    """The best finite return of each environment `[M, K] -> [M]` (-inf when none is finite)."""
    return torch.where(torch.isfinite(returns), returns, float("-inf")).amax(-1)


def mppi_continuous(returns_fn: ReturnsFn, mean: Tensor, cfg: PlannerConfig,
                    generator: torch.Generator | None = None, low: float = -1.0,
                    high: float = 1.0) -> tuple[Tensor, Tensor]:
    """Refine Gaussian plans over skills in [low, high]^D for M environments at once, from the
    means `[M, H_P, D]` (the warm start). Returns the refined means `[M, H_P, D]` (the skill to
    execute is `[:, 0]`) and the best finite return of the last iteration's candidates `[M]`."""
    m, horizon, dim = mean.shape
    std = cfg.variance ** 0.5
    best = mean.new_full((m,), float("-inf"))
    for _ in range(cfg.iterations):
        noise = torch.randn(m, cfg.candidates, horizon, dim, generator=generator, device=mean.device)
        plans = (mean.unsqueeze(1) + std * noise).clamp(low, high)  # [M, K, H_P, D]
        if cfg.smoothing > 0 and horizon > 1:
            smoothed = [plans[:, :, 0]]
            for i in range(1, horizon):
                smoothed.append(cfg.smoothing * smoothed[-1] + (1.0 - cfg.smoothing) * plans[:, :, i])
            plans = torch.stack(smoothed, 2)
        returns = returns_fn(plans)  # [M, K]
        mean = torch.einsum("mk,mkid->mid", _weights(returns, cfg.gamma), plans)
        best = _best(returns)
    return mean, best


def mppi_discrete(returns_fn: ReturnsFn, probs: Tensor, cfg: PlannerConfig,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Refine per-segment categoricals over C codes for M environments at once, from `probs
    [M, H_P, C]` (the warm start). Plans reach `returns_fn` as one-hot vectors `[M, K, H_P, C]`.
    Returns the refined probabilities `[M, H_P, C]` (the code to execute is the most likely of
    `[:, 0]`) and the best finite return of the last iteration's candidates `[M]`."""
    m, horizon, num_codes = probs.shape
    best = probs.new_full((m,), float("-inf"))
    for _ in range(cfg.iterations):
        u = torch.rand(m, cfg.candidates, horizon, 1, generator=generator, device=probs.device)
        cdf = probs.cumsum(-1).unsqueeze(1)  # [M, 1, H_P, C]
        codes = (cdf <= u * cdf[..., -1:]).sum(-1).clamp_max(num_codes - 1)  # [M, K, H_P], inverse CDF
        plans = F.one_hot(codes, num_codes).float()
        returns = returns_fn(plans)
        weighted = torch.einsum("mk,mkic->mic", _weights(returns, cfg.gamma), plans)
        probs = cfg.mix * weighted + (1.0 - cfg.mix) * probs
        best = _best(returns)
    return probs, best


def all_code_plans(num_codes: int, horizon: int, device: torch.device | str | None = None) -> Tensor:
    """Every sequence of `horizon` codes `[num_codes ** horizon, horizon]` int64, the last segment
    varying fastest."""
    index = torch.arange(num_codes ** horizon, device=device)
    place = num_codes ** torch.arange(horizon - 1, -1, -1, device=device)
    return (index.unsqueeze(-1) // place) % num_codes


def exhaustive_discrete(returns_fn: ReturnsFn, m: int, num_codes: int, horizon: int,
                        device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Score every plan of `horizon` codes once for M environments; returns the best plan of each
    as one-hot probabilities `[M, H_P, C]` and its return `[M]` (plans with non-finite returns
    lose to any finite one)."""
    codes = all_code_plans(num_codes, horizon, device)  # [P, H_P]
    plans = F.one_hot(codes, num_codes).float().expand(m, *codes.shape, num_codes)
    returns = returns_fn(plans)  # [M, P]
    index = torch.where(torch.isfinite(returns), returns, float("-inf")).argmax(-1)
    best = _best(returns)
    return F.one_hot(codes[index], num_codes).float(), best


def shift(plan: Tensor, fill: Tensor) -> Tensor:
    """Warm start for the next plan: drop the executed first segment of `plan [M, H_P, X]` and
    append `fill`, one segment for all environments `[X]` or one each `[M, X]` (continuous means,
    uniform probabilities for categoricals)."""
    fill = fill.to(plan).reshape(-1, 1, plan.shape[-1]).expand(plan.shape[0], 1, plan.shape[-1])
    return torch.cat([plan[:, 1:], fill], 1)


# ----------------------------------------------------------------------------- policies


@dataclass
class SkillPlanState:
    """Per-environment state `[N, ...]` of the skill-sequence policies."""

    model: Any
    """The skill model's state (Choreographer: `LatentState`; DADS: None)."""
    skill: Tensor
    """[N, D] float32 the skill held (continuous, or one-hot)."""
    warm: Tensor
    """[N, H_P, D] the warm start of the next plan (means, or categoricals)."""
    steps: Tensor
    """[N] int64 agent steps the current skill has been executed."""
    replanned: Tensor
    """[N] bool: a new skill was chosen at the latest `act`."""
    predicted_return: Tensor
    """[N] float32 the best predicted return of the latest plan (NaN for random skills)."""


class SkillSequencePolicy:
    """Holds a skill per environment for `hold` steps and executes it with the skill model's
    actor; `choose` decides the new skills (planning or random). See the module docstring."""

    def __init__(self, model: SkillModel, hold: int, horizon: int, seed: int, version: int,
                 initial_mean: Literal["zero", "random"] = "zero") -> None:
        if hold < 1 or horizon < 1:
            raise ValueError(f"planner hold and horizon must be at least 1, got {hold} and {horizon}")
        self.model = model
        self.hold = int(hold)
        self.horizon = int(horizon)
        self.skill_dim = model.skill_dim
        self.discrete = model.skill_type == "discrete"
        self.version = int(version)
        self.initial_mean = initial_mean
        self.generator = torch.Generator(model.device).manual_seed(seed)

    def load_weights(self, arrays: dict[str, np.ndarray], version: int) -> None:
        """Planning policies act and plan with the agent they were built with; they take no
        separate acting weights. Given that agent's own acting weights (`agent.policy_weights()`)
        this records `version`; anything else is refused (load it into the agent instead)."""
        own = self.model.acting_weights()
        if set(arrays) != set(own) or any(not np.array_equal(np.asarray(arrays[k]), v) for k, v in own.items()):
            raise ValueError("a planning policy plans with its agent's model (q or the world model), not with "
                             "acting weights alone: load new weights into the agent (agent.load_state_dict)")
        self.version = int(version)

    def _prior_plan(self, n: int, device: torch.device) -> Tensor:
        """The plan distribution's prior `[n, H_P, D]`: uniform categoricals, or the continuous
        means `initial_mean` names: zeros, or draws from N(0, I) with the policy's generator."""
        if self.discrete:
            return torch.full((n, self.horizon, self.skill_dim), 1.0 / self.skill_dim, device=device)
        if self.initial_mean == "random":
            return torch.randn(n, self.horizon, self.skill_dim, generator=self.generator, device=device)
        return torch.zeros(n, self.horizon, self.skill_dim, device=device)

    def initial_state(self, n: int) -> SkillPlanState:
        device = self.model.device
        return SkillPlanState(
            model=self.model.initial_state(n),
            skill=torch.zeros(n, self.skill_dim, device=device),
            warm=self._prior_plan(n, device),
            steps=torch.full((n,), self.hold, dtype=torch.int64, device=device),  # due at the first act
            replanned=torch.zeros(n, dtype=torch.bool, device=device),
            predicted_return=torch.full((n,), float("nan"), device=device),
        )

    def choose(self, context: Any, rows: Tensor, warm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """New skills `[M, D]`, warm starts `[M, H_P, D]` and predicted returns `[M]` for the
        environments `rows [M]`, from their warm starts `[M, H_P, D]`; `context` holds every
        environment's."""
        raise NotImplementedError

    @torch.inference_mode()
    def act(self, observation: np.ndarray, is_first: np.ndarray, state: SkillPlanState,
            mode: Literal["sample", "mode"] = "sample") -> tuple[np.ndarray, SkillPlanState, dict[str, np.ndarray]]:
        """`observation [N, *obs_shape]`, `is_first [N]` -> (action [N, A] float32, new state,
        extras {"skill": [N] int32: the code or discrete skill's index, -1 for continuous skills})."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        device = self.model.device
        obs = torch.as_tensor(np.asarray(observation), device=device)
        first = torch.as_tensor(np.asarray(is_first), dtype=torch.bool, device=device)
        context, model_state = self.model.observe(obs, first, state.model, self.generator)
        skill, warm, steps, predicted = state.skill, state.warm, state.steps, state.predicted_return
        due = first | (steps >= self.hold)
        if bool(due.any()):
            rows = due.nonzero().squeeze(-1)  # [M]
            start = torch.where(first[rows, None, None], self._prior_plan(len(rows), device), warm[rows])
            new_skill, new_warm, new_return = self.choose(context, rows, start)
            skill = skill.index_copy(0, rows, new_skill.to(skill.dtype))
            warm = warm.index_copy(0, rows, new_warm.to(warm.dtype))
            predicted = predicted.index_copy(0, rows, new_return.to(predicted.dtype))
            steps = torch.where(due, 0, steps)
        action, model_state = self.model.act(context, model_state, skill, mode == "sample", self.generator)
        new_state = SkillPlanState(model_state, skill, warm, steps + 1, due, predicted)
        index = skill.argmax(-1) if self.discrete else torch.full_like(steps, -1)
        return (action.float().cpu().numpy(), new_state, {"skill": index.to(torch.int32).cpu().numpy()})


class PlanningPolicy(SkillSequencePolicy):
    """MPPI over sequences of the skill model's skills with its predictions, scored by `reward_fn`
    (module docstring). exhaustive: score every plan once when there are at most K of them
    (discrete skills). version: reported until `load_weights` sets another."""

    def __init__(self, model: SkillModel, reward_fn: RewardFn, planner_cfg: PlannerConfig, seed: int = 0,
                 exhaustive: bool = True, version: int = -1) -> None:
        for key in ("candidates", "iterations"):
            if getattr(planner_cfg, key) < 1:
                raise ValueError(f"planner {key} must be at least 1, got {getattr(planner_cfg, key)}")
        super().__init__(model, planner_cfg.hold, planner_cfg.horizon, seed, version, planner_cfg.initial_mean)
        self.reward_fn = reward_fn
        self.cfg = planner_cfg
        self.exhaustive = exhaustive and self.discrete and self.skill_dim ** self.horizon <= planner_cfg.candidates

    def plan_returns(self, start: Any, rows: Tensor, plans: Tensor) -> Tensor:
        """Predicted returns `[M, K]` of plans `[M, K, H_P, D]` from the contexts `start [M]` of
        the environments `rows [M]`."""
        observations = self.model.imagine(start, plans, self.hold, self.generator)
        rewards = self.reward_fn(observations, rows)
        expected = (*plans.shape[:2], self.horizon * self.hold)
        if tuple(rewards.shape) != expected:
            raise ValueError(f"reward_fn returned shape {tuple(rewards.shape)} for observations of shape "
                             f"{tuple(observations.shape)}; expected {expected}: one reward per environment, "
                             "candidate and predicted step [M, K, H]")
        return rewards.float().sum(-1)

    def choose(self, context: Any, rows: Tensor, warm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        start = context[rows]

        def returns_fn(plans: Tensor) -> Tensor:
            return self.plan_returns(start, rows, plans)

        if not self.discrete:
            mean, best = mppi_continuous(returns_fn, warm, self.cfg, self.generator)
            return mean[:, 0], shift(mean, self._prior_plan(len(rows), warm.device)[:, 0]), best
        if self.exhaustive:
            probs, best = exhaustive_discrete(returns_fn, len(rows), self.skill_dim, self.horizon, warm.device)
        else:
            probs, best = mppi_discrete(returns_fn, warm, self.cfg, self.generator)
        skill = F.one_hot(probs[:, 0].argmax(-1), self.skill_dim).float()
        return skill, shift(probs, torch.full((self.skill_dim,), 1.0 / self.skill_dim)), best


class DadsPlanningPolicy(PlanningPolicy):
    """MPPI in DADS's skill space with q's predictions, executed by the SAC actor (module
    docstring). planner_cfg: default the agent's `cfg.planner` (defaults: the paper's dense-reward
    settings H_P = 1, H_Z = 10, K = 50, R = 10, gamma = 10)."""

    def __init__(self, agent: DadsAgent, reward_fn: RewardFn, planner_cfg: PlannerConfig | None = None,
                 seed: int = 0, exhaustive: bool = True) -> None:
        if not isinstance(agent, DadsAgent):
            raise TypeError(f"DadsPlanningPolicy needs a DadsAgent, got {type(agent).__name__}")
        super().__init__(DadsSkillModel(agent), reward_fn, planner_cfg or agent.cfg.planner, seed, exhaustive,
                         int(agent.updates))


class CodebookPlanningPolicy(PlanningPolicy):
    """MPPI over Choreographer's codebook with the world model's imagination, executed by the
    skill actor (module docstring). planner_cfg: default the agent's `cfg.planner` (defaults:
    H_P = 1, H_Z = 10, K = 50, R = 10, gamma = 10; with 64 codes and H_P = 1 raise K to 64 for an
    exhaustive search). imagination: "mode" or "sample" latents in the imagined rollouts."""

    def __init__(self, agent: ChoreographerAgent, reward_fn: RewardFn, planner_cfg: PlannerConfig | None = None,
                 seed: int = 0, exhaustive: bool = True, imagination: Literal["mode", "sample"] = "mode") -> None:
        if not isinstance(agent, ChoreographerAgent):
            raise TypeError(f"CodebookPlanningPolicy needs a ChoreographerAgent, got {type(agent).__name__}")
        super().__init__(CodebookSkillModel(agent, imagination), reward_fn, planner_cfg or agent.cfg.planner, seed,
                         exhaustive, int(agent.updates))


class RandomSkillPolicy(SkillSequencePolicy):
    """The baseline of the planning policies: a skill drawn from the prior (continuous: U(-1, 1)^D;
    discrete skills and codes: a uniform one-hot) held `planner_cfg.hold` steps per environment
    (and redrawn at every episode start), executed by the same skill actor. planner_cfg: default
    the agent's `cfg.planner`."""

    def __init__(self, agent: DadsAgent | ChoreographerAgent, planner_cfg: PlannerConfig | None = None,
                 seed: int = 0) -> None:
        model = skill_model(agent)
        planner_cfg = planner_cfg or agent.cfg.planner
        super().__init__(model, planner_cfg.hold, planner_cfg.horizon, seed, int(agent.updates))

    def choose(self, context: Any, rows: Tensor, warm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        skill_type = "discrete" if self.discrete else "continuous"
        skill = sample_prior((len(rows),), self.skill_dim, skill_type, self.generator, warm.device)
        return skill, warm, torch.full((len(rows),), float("nan"), device=warm.device)
