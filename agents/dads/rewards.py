"""The skill prior, the DADS intrinsic reward and off-DADS importance weights.

DADS reward (reference brief 1.3, `compute_dads_reward`), for a transition (s, z, s') and L
alternative skills z_1..z_L:

    r = log(L + 1) - log(1 + sum_i exp(clip(log q(s'|s,z_i) - log q(s'|s,z), -50, 50)))
      = log q(s'|s,z) - log[(q(s'|s,z) + sum_i q(s'|s,z_i)) / (L + 1)]      (without the clip)

The current skill counts once in the denominator, so r <= log(L + 1). Continuous skills: the z_i
are drawn i.i.d. from the prior U(-1, 1)^D for every transition. Discrete skills: the z_i are the
other K - 1 one-hot skills, which makes the sum over skills exact: r = log K - log sum_k q_k / q_z.
The sum is computed with logsumexp after the clip (the same value, without overflow).

Importance weights (off-DADS, brief 2.4): w = clip(pi_current(a|s,z) / pi_behaviour(a|s,z), 1/eps,
eps), computed from log-probabilities; eps <= 1 switches them off (all 1), as in the reference.
They weight q's likelihood only, never SAC.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LogProbFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""log_prob(state [N, S], skill [N, D], next_state [N, S]) -> [N], e.g. `SkillDynamics.log_prob`."""

LOG_RATIO_CLIP = 50.0
"""The reference clips each log q(s'|s,z_i) - log q(s'|s,z) to [-50, 50] before exponentiating."""


def sample_prior(shape: tuple[int, ...], skill_dim: int, skill_type: str, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Skills `[*shape, D]` from the prior: U(-1, 1)^D ("continuous") or uniform one-hot vectors
    ("discrete"), float32."""
    if skill_type == "continuous":
        return torch.rand(*shape, skill_dim, generator=generator, device=device) * 2.0 - 1.0
    if skill_type == "discrete":
        index = torch.randint(skill_dim, shape, generator=generator, device=device)
        return F.one_hot(index, skill_dim).float()
    raise ValueError(f"unknown skill_type {skill_type!r}; valid: continuous, discrete")


def other_skills(skill: Tensor) -> Tensor:
    """For one-hot skills `[N, K]`, the other K - 1 one-hot skills of each row `[N, K - 1, K]`
    (the current one rolled by 1..K-1, as the reference's exact marginalisation)."""
    k = skill.shape[-1]
    index = skill.argmax(-1, keepdim=True)  # [N, 1]
    shifts = torch.arange(1, k, device=skill.device)  # [K - 1]
    return F.one_hot((index + shifts) % k, k).to(skill.dtype)


def alternative_skills(skill: Tensor, skill_type: str, prior_samples: int,
                       generator: torch.Generator | None = None) -> Tensor:
    """The alternatives of the reward's denominator for each skill `[N, D]` -> `[N, L, D]`: L prior
    samples per transition (continuous), or all the other skills (discrete, L = D - 1)."""
    if skill_type == "discrete":
        return other_skills(skill)
    return sample_prior((skill.shape[0], prior_samples), skill.shape[-1], skill_type, generator, skill.device)


def dads_reward(log_prob: LogProbFn, state: Tensor, skill: Tensor, next_state: Tensor, alternatives: Tensor,
                chunk_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """The DADS reward (module docstring) of transitions `state [N, S]`, `skill [N, D]`,
    `next_state [N, S]` against `alternatives [N, L, D]`. Returns (reward [N], log q(s'|s,z) [N]).

    Evaluates log_prob on N x L rows, `chunk_rows` at a time (whole transitions per chunk). Each
    transition's state is repeated L times in a row (interleaved), matching `alternatives`' layout;
    call it without gradients and with q in evaluation mode (running statistics)."""
    n, count = state.shape[0], alternatives.shape[1]
    log_q = log_prob(state, skill, next_state)  # [N]
    per_chunk = max(1, chunk_rows // max(count, 1))
    log_alt = []
    for start in range(0, n, per_chunk):
        s, s2 = state[start:start + per_chunk], next_state[start:start + per_chunk]
        alt = alternatives[start:start + per_chunk]  # [n, L, D]
        rows = s.shape[0] * count
        tiled = [x.unsqueeze(1).expand(-1, count, -1).reshape(rows, -1) for x in (s, s2)]
        log_alt.append(log_prob(tiled[0], alt.reshape(rows, -1), tiled[1]).view(-1, count))  # [n, L]
    diff = (torch.cat(log_alt) - log_q.unsqueeze(1)).clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)  # [N, L]
    terms = torch.cat([torch.zeros_like(log_q).unsqueeze(1), diff], 1)  # [N, L + 1]: the current skill, exp(0)
    reward = math.log(count + 1) - torch.logsumexp(terms, 1)
    return reward, log_q


def importance_weights(logp_current: Tensor, logp_behaviour: Tensor, clip: float, normalize: bool = False,
                       mask: Tensor | None = None) -> Tensor:
    """clip(exp(logp_current - logp_behaviour), 1/clip, clip) `[N]`; all ones when clip <= 1.
    normalize: divide by the mean weight (over the rows where `mask` is set)."""
    if clip <= 1.0:
        return torch.ones_like(logp_current)
    bound = math.log(clip)
    weights = (logp_current - logp_behaviour).clamp(-bound, bound).exp()
    if normalize:
        if mask is None:
            mean = weights.mean()
        else:
            mask = mask.bool()
            mean = torch.where(mask, weights, 0.0).sum() / mask.sum().clamp_min(1)
        weights = weights / mean.clamp_min(1e-8)
    return weights
