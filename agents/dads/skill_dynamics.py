"""Skill dynamics q(s' | s, z): a mixture of Gaussians of fixed identity covariance over the change
of state, in a standardised space (reference brief 1.2).

q's state space: the observation, or only the dims named by `dynamics_dims` (the x-y prior; e.g.
Ant's x, y). Callers bring observations into it with `project`; `log_prob`, `predict` and the
loss take states of that space `[..., S]`.

- Target: delta = s' - s, standardised with batch statistics in training and running statistics
  otherwise (no learned scale or shift); the mixture's unit variances apply in that space.
- Input: the state, minus the omitted global coordinates (the first `omit_coordinates`
  observation dims, "observation omission"), standardised the same way with a learned scale and
  shift (the reference's input batch norm), concatenated with the skill z. Omitted coordinates are
  still predicted. With the x-y prior on the omitted dims, q sees z only.
- Running statistics are buffers, updated only by forward passes in training mode, with the
  reference's TensorFlow batch-norm settings (momentum 0.99, i.e. a new batch weighs 0.01, and
  epsilon 1e-3), and never from a batch whose statistics are not finite.
- `log_prob` is the log-density of the standardised change, as in the reference. It differs from
  the density of s' by the standardisation's log-Jacobian, the same for every skill, so the DADS
  reward (a ratio of densities of one s' under several skills) is unaffected.
- `predict` returns the state moved by the mixture's mean change (the reference's
  `_use_modal_mean=False`), de-standardised with the running statistics, in q's state space: a
  deterministic model step for the planner.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from choreo.agents.dads.config import DadsConfig
from choreo.agents.dads.nets import ReluMLP

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def take(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """`x[..., dims]`, as a slice (a view) when the dims are contiguous and ascending."""
    if dims and dims == tuple(range(dims[0], dims[0] + len(dims))):
        return x[..., dims[0]:dims[0] + len(dims)]
    return x[..., list(dims)]


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `x [N]` over the rows where `mask [N]` is set (0 when none is); masked rows may be
    NaN or infinite."""
    if mask is None:
        return x.mean()
    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


class RunningNorm(nn.Module):
    """Standardises features `[N, D]`: (x - mean) / sqrt(var + eps), with the batch's (masked)
    statistics in training mode and the running ones otherwise; `affine` adds a learned scale and
    shift. In training mode every forward moves the running statistics by `momentum` toward the
    batch's (biased variance, as TensorFlow), unless the batch has no row or non-finite statistics.
    """

    def __init__(self, dim: int, momentum: float, eps: float, affine: bool) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.weight = self.bias = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.training:
            mean, var = self._batch_moments(x, mask)
        else:
            mean, var = self.mean, self.var
        return self._affine((x - mean) * torch.rsqrt(var + self.eps))

    def running(self, x: Tensor) -> Tensor:
        """Standardise with the running statistics, whatever the mode."""
        return self._affine((x - self.mean) * torch.rsqrt(self.var + self.eps))

    def denormalize(self, y: Tensor) -> Tensor:
        """Inverse of the standardisation with the running statistics (no affine part)."""
        return y * torch.sqrt(self.var + self.eps) + self.mean

    def _affine(self, y: Tensor) -> Tensor:
        return y if self.weight is None else y * self.weight + self.bias

    def _batch_moments(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask is None:
            w = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        else:
            w = mask.to(x.dtype).unsqueeze(-1)  # [N, 1]
        total = w.sum()
        x = torch.where(w > 0, x, 0.0)  # masked rows may hold anything
        mean = (w * x).sum(0) / total.clamp_min(1e-8)  # [D]
        var = (w * (x - mean).square()).sum(0) / total.clamp_min(1e-8)
        with torch.no_grad():
            ok = (total > 0) & torch.isfinite(mean).all() & torch.isfinite(var).all()
            rate = torch.where(ok, self.momentum, 0.0)
            self.mean.lerp_(torch.where(ok, mean, self.mean), rate)
            self.var.lerp_(torch.where(ok, var, self.var), rate)
        return mean, var


class SkillDynamics(nn.Module):
    """q(delta | s, z) for observations of size `obs_dim` and skills of size `skill_dim`; see the
    module docstring. Shapes: states `[..., S]` (q's state space, see `project`), skills `[..., D]`.
    """

    def __init__(self, obs_dim: int, skill_dim: int, cfg: DadsConfig) -> None:
        super().__init__()
        dims = tuple(cfg.dynamics_dims) or tuple(range(obs_dim))
        if len(set(dims)) != len(dims) or not all(0 <= d < obs_dim for d in dims):
            raise ValueError(f"agent.dads.dynamics_dims {cfg.dynamics_dims} must be distinct dims of the "
                             f"{obs_dim}-dim observation")
        if not 0 <= cfg.omit_coordinates <= obs_dim:
            raise ValueError(f"agent.dads.omit_coordinates {cfg.omit_coordinates} is outside 0..{obs_dim}")
        self.state_dims = dims
        """Observation dims of q's state space."""
        self.input_positions = tuple(j for j, d in enumerate(dims) if d >= cfg.omit_coordinates)
        """Positions within q's state that q sees (the omitted coordinates removed)."""
        self.state_dim = len(dims)
        self.skill_dim = skill_dim
        self.components = cfg.num_components
        in_dim = len(self.input_positions)
        norm = dict(momentum=cfg.norm_momentum, eps=cfg.norm_eps)
        self.input_norm = RunningNorm(in_dim, affine=True, **norm) if cfg.normalize and in_dim else None
        self.target_norm = RunningNorm(self.state_dim, affine=False, **norm) if cfg.normalize else None
        self.net = ReluMLP(in_dim + skill_dim, self.components * (1 + self.state_dim), cfg.hidden, cfg.layers)

    def project(self, observation: Tensor) -> Tensor:
        """`[..., obs_dim] -> [..., S]`: the observation dims of q's state space."""
        return take(observation, self.state_dims)

    def mixture(self, state: Tensor, skill: Tensor, mask: Tensor | None = None,
                running: bool = False) -> tuple[Tensor, Tensor]:
        """Log mixture weights `[N, C]` and component means `[N, C, S]` (standardised change) for
        `state [N, S]`, `skill [N, D]`. running: standardise with the running statistics even in
        training mode (no statistics are updated then)."""
        x = take(state, self.input_positions)
        if self.input_norm is not None:
            x = self.input_norm.running(x) if running else self.input_norm(x, mask)
        out = self.net(torch.cat([x, skill.to(x.dtype)], -1))
        logits, means = out.split([self.components, self.components * self.state_dim], -1)
        return torch.log_softmax(logits, -1), means.unflatten(-1, (self.components, self.state_dim))

    def log_prob(self, state: Tensor, skill: Tensor, next_state: Tensor, mask: Tensor | None = None) -> Tensor:
        """log q(s' | s, z) of the standardised change: `[..., S], [..., D], [..., S] -> [...]`.
        In training mode the batch's statistics standardise (and update the running ones),
        restricted to the rows where `mask [...]` is set; otherwise the running ones."""
        lead = state.shape[:-1]
        state, next_state = state.reshape(-1, self.state_dim), next_state.reshape(-1, self.state_dim)
        skill = skill.reshape(-1, self.skill_dim)
        mask = None if mask is None else mask.reshape(-1)
        target = next_state - state  # [N, S]
        if self.target_norm is not None:
            target = self.target_norm(target, mask)
        log_w, means = self.mixture(state, skill, mask)  # [N, C], [N, C, S]
        log_comp = -0.5 * (target.unsqueeze(1) - means).square().sum(-1) - self.state_dim * _HALF_LOG_2PI  # [N, C]
        return torch.logsumexp(log_w + log_comp, -1).reshape(lead)

    def predict(self, state: Tensor, skill: Tensor) -> Tensor:
        """The next state `[..., S]` after one step of skill `z`: s + the mixture's mean change,
        de-standardised with the running statistics (whatever the mode)."""
        lead = state.shape[:-1]
        flat = state.reshape(-1, self.state_dim)
        log_w, means = self.mixture(flat, skill.reshape(-1, self.skill_dim), running=True)
        delta = (log_w.exp().unsqueeze(-1) * means).sum(1)  # [N, S]
        if self.target_norm is not None:
            delta = self.target_norm.denormalize(delta)
        return (flat + delta).reshape(*lead, self.state_dim)


def dynamics_loss(model: SkillDynamics, state: Tensor, skill: Tensor, next_state: Tensor,
                  weights: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted negative log-likelihood of q: -mean(w * log q(s' | s, z)) over the rows where `mask`
    is set (all when None). `state, next_state [N, S]`, `skill [N, D]`, `weights, mask [N]`;
    `weights` are off-DADS importance weights (see `rewards.importance_weights`), None for 1.
    In training mode the forward pass updates q's running statistics (as a batch norm does)."""
    log_q = model.log_prob(state, skill, next_state, mask)  # [N]
    weighted = log_q if weights is None else weights * log_q
    loss = -masked_mean(weighted, mask)
    return loss, {"dynamics/loss": loss.detach(), "dynamics/log_prob": masked_mean(log_q.detach(), mask)}
