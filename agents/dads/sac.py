"""Soft actor-critic as DADS uses it (tf-agents 0.4.0 `SacAgent`, reference brief 2.1).

- Actor: ReLU MLP -> mean and log-std (clipped to [log_std_min, log_std_max]) of a Gaussian,
  squashed by tanh; the output layer starts at 0.1 of its initial scale.
- Twin critics Q(s, a) on concat(input, action), each with a target copy moved by `tau` after
  every critic step.
- Learned temperature alpha = exp(log_alpha), target entropy -target_entropy_scale * action_dim.
- Critic target: reward_scale * r + discount * d * (min_j Q'_j(s', a') - alpha log pi(a'|s')),
  a' ~ pi(.|s'); loss: the sum of both critics' mean squared errors. Actor loss:
  E[alpha log pi(a|s) - min_j Q_j(s, a)]. Temperature loss: -log_alpha (log pi + target).
- One step (`Sac.update`): critics, then actor, then temperature, then the targets.

"Input" here is whatever the policy sees; for DADS the observation without its omitted
coordinates, with the skill concatenated last. Every loss averages over the rows where `mask` is
set (transitions across an episode start are not transitions).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from choreo.agents.actor_critic import Optimizer, either
from choreo.agents.dads.config import DadsConfig
from choreo.agents.dads.nets import ReluMLP
from choreo.agents.dads.skill_dynamics import masked_mean
from choreo.agents.nets import frozen

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG2 = math.log(2.0)
_ACTION_BOUND = 1.0 - 1e-6
"""Actions are clamped to this before atanh when their log-probability is recomputed."""


class SquashedNormal:
    """tanh(u), u ~ Normal(mean, exp(log_std)), independent over the last (action) dim.

    `rsample` returns actions and their log-probabilities computed from u (exact); `log_prob`
    recomputes a given action's from atanh(action clamped to +-(1 - 1e-6)). Both the acting policy
    (behaviour log-probabilities) and the learner (current ones) use `log_prob`, so the two agree
    exactly for equal weights. Shapes: mean, log_std `[..., A]`; actions `[..., A]`; log-probs `[...]`.
    """

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean = mean
        self.log_std = log_std

    @classmethod
    def from_output(cls, out: Tensor, log_std_min: float, log_std_max: float) -> SquashedNormal:
        mean, log_std = out.float().chunk(2, -1)
        return cls(mean, log_std.clamp(log_std_min, log_std_max))

    @property
    def mode(self) -> Tensor:
        return torch.tanh(self.mean)

    def _log_prob_u(self, u: Tensor) -> Tensor:
        z = (u - self.mean) * torch.exp(-self.log_std)
        gauss = (-0.5 * z.square() - self.log_std - _HALF_LOG_2PI).sum(-1)
        log_det = (2.0 * (_LOG2 - u - F.softplus(-2.0 * u))).sum(-1)  # sum of log(1 - tanh(u)^2)
        return gauss - log_det

    def rsample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        u = self.mean + self.log_std.exp() * eps
        return torch.tanh(u), self._log_prob_u(u)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample(generator)[0]

    def log_prob(self, action: Tensor) -> Tensor:
        return self._log_prob_u(torch.atanh(action.clamp(-_ACTION_BOUND, _ACTION_BOUND)))


def build_actor(input_dim: int, action_dim: int, cfg: DadsConfig) -> ReluMLP:
    """The actor network `[..., input_dim] -> [..., 2 * action_dim]` (mean, log-std); the acting
    policy builds the same one, so that its weights load by name."""
    return ReluMLP(input_dim, 2 * action_dim, cfg.hidden, cfg.layers, out_scale=0.1)


class Sac(nn.Module):
    """Actor, twin critics and their targets, the learned temperature, and three Adam optimisers
    (actor; both critics; temperature). `state_dict()` holds all of it: the optimisers' states
    ride along as this module's extra state. Create it on its final device."""

    def __init__(self, input_dim: int, action_dim: int, cfg: DadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.action_dim = action_dim
        self.target_entropy = -cfg.target_entropy_scale * action_dim
        self.actor = build_actor(input_dim, action_dim, cfg)
        self.critic1 = ReluMLP(input_dim + action_dim, 1, cfg.hidden, cfg.layers)
        self.critic2 = ReluMLP(input_dim + action_dim, 1, cfg.hidden, cfg.layers)
        self.target1 = copy.deepcopy(self.critic1).requires_grad_(False)
        self.target2 = copy.deepcopy(self.critic2).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(float(cfg.initial_log_alpha)))
        critics = [*self.critic1.parameters(), *self.critic2.parameters()]
        self.actor_opt = Optimizer(self.actor.parameters(), cfg.lr, cfg.adam_eps, 0.0, name="sac/actor")
        self.critic_opt = Optimizer(critics, cfg.lr, cfg.adam_eps, 0.0, name="sac/critic")
        self.alpha_opt = Optimizer([self.log_alpha], cfg.lr, cfg.adam_eps, 0.0, name="sac/alpha")

    def policy(self, inputs: Tensor) -> SquashedNormal:
        return SquashedNormal.from_output(self.actor(inputs), self.cfg.log_std_min, self.cfg.log_std_max)

    def q_values(self, inputs: Tensor, action: Tensor, target: bool = False) -> tuple[Tensor, Tensor]:
        """Both critics' (or targets') values `[N]` of `inputs [N, I]`, `action [N, A]`."""
        x = torch.cat([inputs, action.to(inputs.dtype)], -1)
        first, second = (self.target1, self.target2) if target else (self.critic1, self.critic2)
        return first(x).squeeze(-1), second(x).squeeze(-1)

    def get_extra_state(self) -> dict[str, Any]:
        return {"actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])

    def update(self, inputs: Tensor, action: Tensor, reward: Tensor, discount: Tensor, next_inputs: Tensor,
               mask: Tensor | None, generator: torch.Generator | None = None,
               skip: Tensor | None = None) -> dict[str, Tensor]:
        """One SAC step on transitions `inputs [N, I]`, `action [N, A]`, `reward [N]` (unscaled),
        `discount [N]` (0 after a termination), `next_inputs [N, I]`, `mask [N]`. `skip` (0-d)
        nonzero: compute but change nothing; the first non-finite loss skips the rest of the step.
        Returns detached metrics (with `sac/*/nonfinite` flags)."""
        cfg = self.cfg
        loss, metrics = critic_loss(self, inputs, action, reward, discount, next_inputs, mask, cfg.discount,
                                    cfg.reward_scale, generator)
        metrics.update(self.critic_opt.step(loss, skip))
        skip = either(skip, metrics["sac/critic/nonfinite"])

        with frozen(self.critic1, self.critic2):
            loss, m, log_pi = actor_loss(self, inputs, mask, generator)
        metrics.update(m)
        metrics.update(self.actor_opt.step(loss, skip))
        skip = either(skip, metrics["sac/actor/nonfinite"])

        loss, m = alpha_loss(self.log_alpha, log_pi, self.target_entropy, mask)
        metrics.update(m)
        metrics.update(self.alpha_opt.step(loss, skip))
        skip = either(skip, metrics["sac/alpha/nonfinite"])

        with torch.no_grad():  # the targets follow only a step that was taken
            rate = cfg.tau * (1.0 - skip)
            for target, critic in ((self.target1, self.critic1), (self.target2, self.critic2)):
                for t, c in zip(target.parameters(), critic.parameters()):
                    t.lerp_(c, rate)
        return metrics


def critic_loss(sac: Sac, inputs: Tensor, action: Tensor, reward: Tensor, discount: Tensor, next_inputs: Tensor,
                mask: Tensor | None, gamma: float, reward_scale: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of both critics' mean squared TD errors (see the module docstring). Shapes as `Sac.update`."""
    with torch.no_grad():
        alpha = sac.log_alpha.exp()
        next_action, next_log_pi = sac.policy(next_inputs).rsample(generator)
        next_q = torch.minimum(*sac.q_values(next_inputs, next_action, target=True))
        target = reward_scale * reward + gamma * discount * (next_q - alpha * next_log_pi)  # [N]
    q1, q2 = sac.q_values(inputs, action)
    loss = masked_mean((q1 - target).square(), mask) + masked_mean((q2 - target).square(), mask)
    return loss, {"sac/q": masked_mean(q1.detach(), mask), "sac/target_q": masked_mean(target, mask)}


def actor_loss(sac: Sac, inputs: Tensor, mask: Tensor | None,
               generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """E[alpha log pi(a|s) - min_j Q_j(s, a)] with reparameterised actions; also returns the
    detached log-probabilities `[N]` for the temperature loss. Call with the critics frozen."""
    action, log_pi = sac.policy(inputs).rsample(generator)
    q = torch.minimum(*sac.q_values(inputs, action))
    alpha = sac.log_alpha.detach().exp()
    loss = masked_mean(alpha * log_pi - q, mask)
    return loss, {"sac/entropy": -masked_mean(log_pi.detach(), mask)}, log_pi.detach()


def alpha_loss(log_alpha: Tensor, log_pi: Tensor, target_entropy: float,
               mask: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """-log_alpha * (log pi + target_entropy), averaged: alpha grows while the policy's entropy is
    below the target. `log_pi [N]` detached."""
    loss = -log_alpha * masked_mean(log_pi + target_entropy, mask)
    return loss, {"sac/alpha": log_alpha.detach().exp()}
