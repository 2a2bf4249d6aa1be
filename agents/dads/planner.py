"""Model-predictive control in skill space: MPPI over plans of H_P skills, each held H_Z steps
(paper Sec. 4, Algorithm 2 and App. A.5; reference brief section 3).

Generic over the model: `step_fn(states [K, ...], skills [K, D]) -> next states [K, ...]` (DADS's
`SkillDynamics.predict`, or a world model rolling the skill actor H_Z steps per call of H_Z = 1)
and `reward_fn(states [K, ...]) -> [K]`, the task's reward of each simulated state. States may be
a tensor or any nesting of tensors (dicts, tuples, objects with `.map` such as the RSSM's
`State`); the start state is one state without the K dim and is tiled. All K candidate plans are
simulated as one batch; the loops run over refinement iterations and time steps only.

A plan's return is the sum of the rewards of its H_P * H_Z simulated states.
Continuous skills (`mppi_continuous`): per segment a Gaussian N(mu_i, variance I); each iteration
samples K plans, clips them to the prior's support [-1, 1], optionally smooths them
(z_i <- beta z_{i-1} + (1 - beta) z_i), and sets mu_i = sum_k w_k z_{k,i} with
w = softmax(gamma (R - max R)). The skill to execute is mu_1 (as the reference's
`_get_expected_primitive`). Decisions: mu starts at the prior's centre 0 (the reference draws it at
random), and a warm start (`shift`) drops the executed segment and appends a fresh centred one.
Discrete skills (`mppi_discrete`): per segment a categorical over N codes, starting uniform;
each iteration samples K plans and mixes the return-weighted frequencies into it,
p_i <- mix * sum_k w_k 1[z_{k,i} = c] + (1 - mix) * p_i. The skill to execute is the most likely
code of the first segment. Plans of N codes are fed to `step_fn` as one-hot vectors [K, N].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from choreo.agents.dads.config import PlannerConfig

StepFn = Callable[[Any, Tensor], Any]
"""step_fn(states [K, ...], skills [K, D]) -> next states [K, ...]."""
RewardFn = Callable[[Any], Tensor]
"""reward_fn(states [K, ...]) -> rewards [K]."""


def tile(state: Any, k: int) -> Any:
    """`state` (a tensor or a nesting of them, without the batch dim) repeated k times along a new
    leading dim (a broadcast view)."""
    if isinstance(state, Tensor):
        return state.unsqueeze(0).expand(k, *state.shape)
    if isinstance(state, dict):
        return {key: tile(v, k) for key, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(tile(v, k) for v in state)
    if hasattr(state, "map"):
        return state.map(lambda t: tile(t, k))
    raise TypeError(f"cannot tile a state of type {type(state).__name__}")


def _device(state: Any) -> torch.device:
    if isinstance(state, Tensor):
        return state.device
    if isinstance(state, dict):
        return _device(next(iter(state.values())))
    if isinstance(state, (tuple, list)):
        return _device(state[0])
    if dataclasses.is_dataclass(state):
        return _device(getattr(state, dataclasses.fields(state)[0].name))
    raise TypeError(f"cannot find the device of a state of type {type(state).__name__}")


def plan_returns(step_fn: StepFn, reward_fn: RewardFn, start: Any, plans: Tensor, hold: int) -> Tensor:
    """Returns `[K]` of `plans [K, H_P, D]` from the tiled `start` states: segment i's skill is
    held for `hold` model steps, and every simulated state's reward is summed."""
    states, total = start, None
    for i in range(plans.shape[1]):
        skill = plans[:, i]
        for _ in range(hold):
            states = step_fn(states, skill)
            reward = reward_fn(states).float()
            total = reward if total is None else total + reward
    return total


@dataclass
class ContinuousPlan:
    skill: Tensor
    """[D] the skill to execute now: the refined mean of the first segment."""
    mean: Tensor
    """[H_P, D] the refined means of every segment (shift it for the next call's warm start)."""
    best_return: Tensor
    """0-d: the best return among the last iteration's candidates."""


@dataclass
class DiscretePlan:
    skill: Tensor
    """[N] one-hot of the code to execute now."""
    index: int
    """The code to execute now: the most likely code of the first segment."""
    probs: Tensor
    """[H_P, N] the refined categorical of every segment (shift it for a warm start)."""
    best_return: Tensor
    """0-d: the best return among the last iteration's candidates."""


def _weights(returns: Tensor, gamma: float) -> Tensor:
    """MPPI weights softmax(gamma (R - max R)) `[K]`."""
    return torch.softmax(gamma * (returns - returns.max()), 0)


@torch.no_grad()
def mppi_continuous(step_fn: StepFn, reward_fn: RewardFn, state: Any, cfg: PlannerConfig, skill_dim: int,
                    mean: Tensor | None = None, generator: torch.Generator | None = None,
                    low: float = -1.0, high: float = 1.0) -> ContinuousPlan:
    """Refine Gaussian plans over continuous skills in [low, high]^D (module docstring). `state`:
    one start state; `mean [H_P, D]`: a warm start (default zeros)."""
    device = _device(state)
    k, horizon = cfg.candidates, cfg.horizon
    mean = torch.zeros(horizon, skill_dim, device=device) if mean is None else mean.to(device).float()
    std = cfg.variance ** 0.5
    start = tile(state, k)
    best = torch.tensor(float("-inf"), device=device)
    for _ in range(cfg.iterations):
        noise = torch.randn(k, horizon, skill_dim, generator=generator, device=device)
        plans = (mean + std * noise).clamp(low, high)  # [K, H_P, D]
        if cfg.smoothing > 0 and horizon > 1:
            smoothed = [plans[:, 0]]
            for i in range(1, horizon):
                smoothed.append(cfg.smoothing * smoothed[-1] + (1.0 - cfg.smoothing) * plans[:, i])
            plans = torch.stack(smoothed, 1)
        returns = plan_returns(step_fn, reward_fn, start, plans, cfg.hold)  # [K]
        mean = torch.einsum("k,kid->id", _weights(returns, cfg.gamma), plans)
        best = returns.max()
    return ContinuousPlan(skill=mean[0].clone(), mean=mean, best_return=best)


def _sample_codes(probs: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Code indices `[K, H_P]` drawn from each segment's categorical `probs [H_P, N]` (inverse CDF)."""
    u = torch.rand(k, probs.shape[0], 1, generator=generator, device=probs.device)
    cdf = probs.cumsum(-1)  # [H_P, N]
    return (cdf.unsqueeze(0) <= u * cdf[:, -1:].unsqueeze(0)).sum(-1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def mppi_discrete(step_fn: StepFn, reward_fn: RewardFn, state: Any, cfg: PlannerConfig, num_skills: int,
                  probs: Tensor | None = None, generator: torch.Generator | None = None) -> DiscretePlan:
    """Refine per-segment categoricals over `num_skills` codes (module docstring). `state`: one
    start state; `probs [H_P, N]`: a warm start (default uniform)."""
    device = _device(state)
    k, horizon = cfg.candidates, cfg.horizon
    if probs is None:
        probs = torch.full((horizon, num_skills), 1.0 / num_skills, device=device)
    probs = probs.to(device).float()
    start = tile(state, k)
    best = torch.tensor(float("-inf"), device=device)
    for _ in range(cfg.iterations):
        codes = _sample_codes(probs, k, generator)  # [K, H_P]
        plans = F.one_hot(codes, num_skills).float()  # [K, H_P, N]
        returns = plan_returns(step_fn, reward_fn, start, plans, cfg.hold)
        weighted = torch.einsum("k,kin->in", _weights(returns, cfg.gamma), plans)  # [H_P, N]
        probs = cfg.mix * weighted + (1.0 - cfg.mix) * probs
        best = returns.max()
    index = int(probs[0].argmax())
    return DiscretePlan(skill=F.one_hot(torch.tensor(index, device=device), num_skills).float(), index=index,
                        probs=probs, best_return=best)


def shift(plan: Tensor, fill: Tensor) -> Tensor:
    """Warm start for the next replanning: drop the executed first segment of `plan [H_P, X]` and
    append `fill [X]` (zeros for continuous means, uniform probabilities for discrete ones)."""
    return torch.cat([plan[1:], fill.to(plan).unsqueeze(0)], 0)


class SkillPlanner:
    """Receding-horizon planning over skills: `plan(state)` refines the warm-started plan and
    returns the skill vector `[D]` to execute for the next `cfg.hold` environment steps; `reset()`
    at an episode start. skill_type: "continuous" (skills in [-1, 1]^D) or "discrete" (D codes,
    returned as one-hot vectors)."""

    def __init__(self, step_fn: StepFn, reward_fn: RewardFn, cfg: PlannerConfig, skill_dim: int,
                 skill_type: str = "continuous", generator: torch.Generator | None = None) -> None:
        if skill_type not in ("continuous", "discrete"):
            raise ValueError(f"unknown skill_type {skill_type!r}; valid: continuous, discrete")
        self.step_fn, self.reward_fn = step_fn, reward_fn
        self.cfg = cfg
        self.skill_dim = skill_dim
        self.skill_type = skill_type
        self.generator = generator
        self.warm: Tensor | None = None

    def reset(self) -> None:
        self.warm = None

    def plan(self, state: Any) -> Tensor:
        if self.skill_type == "continuous":
            result = mppi_continuous(self.step_fn, self.reward_fn, state, self.cfg, self.skill_dim, self.warm,
                                     self.generator)
            self.warm = shift(result.mean, torch.zeros(self.skill_dim))
            return result.skill
        result = mppi_discrete(self.step_fn, self.reward_fn, state, self.cfg, self.skill_dim, self.warm,
                               self.generator)
        self.warm = shift(result.probs, torch.full((self.skill_dim,), 1.0 / self.skill_dim))
        return result.skill
