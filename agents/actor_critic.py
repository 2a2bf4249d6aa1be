"""Actor-critic trained in imagination (DreamerV2 style, dynamics backpropagation), its optimizer,
and lambda-returns.

One `ActorCritic.update` imagines `horizon` steps from a batch of start states with the actor,
scores them with a caller-supplied reward function, and takes one Adam step on the actor and one
on the critic. The world model is used, never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from choreo.agents.collective import SOLO, Collective
from choreo.agents.config import ActorCriticConfig
from choreo.agents.distributions import TruncatedNormal
from choreo.agents.nets import MLP, frozen
from choreo.agents.world_model import State, Trajectory, WorldModel, imagine


class Optimizer:
    """Adam with a gradient-norm clip and the reference's multiplicative weight decay.

    `step(loss)`: zero the gradients, backpropagate, clip the global gradient norm to `grad_clip`,
    decay every parameter as p <- (1 - weight_decay) p (not scaled by lr; biases and norms
    included), then take the Adam step. Returns `{name}/loss`, `{name}/grad_norm` (the norm
    before clipping) and `{name}/nonfinite` as detached 0-d tensors.

    Non-finite guard: when the loss or the gradient norm is NaN or infinite (`{name}/nonfinite`
    is then 1.0, else 0.0), or when the caller's `skip` (a 0-d tensor) is nonzero, the step is
    skipped as a whole: no weight decay, no parameter change, no change of Adam's moments or
    step count (only Adam's state may be created, zeroed, if this was the first step). With
    fused Adam (CPU and CUDA) the decision stays on the device, with no host synchronisation:
    the flag is Adam's `found_inf`, the input fused Adam uses to skip a step for gradient
    scaling. The foreach fallback (other devices) reads the flag on the host.

    Several learners (`collective`, see `agents.collective`): the gradients are averaged over the
    ranks before the clip, in one flat transfer that also carries each rank's "loss not finite"
    flag, so that every rank clips, decides to skip and steps alike. A parameter without a
    gradient on this rank counts as a zero gradient.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, eps: float, grad_clip: float,
                 weight_decay: float = 0.0, name: str = "optimizer", collective: Collective = SOLO) -> None:
        self.params = list(params)
        self.name = name
        self.collective = collective
        self.grad_clip = grad_clip
        self.weight_decay = weight_decay
        self.fused = _fused_adam_ok(self.params)
        fast = {"fused": True} if self.fused else {"foreach": True}
        self.adam = torch.optim.Adam(self.params, lr=lr, eps=eps, betas=(0.9, 0.999), **fast)

    def step(self, loss: Tensor, skip: Tensor | None = None) -> dict[str, Tensor]:
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        return {f"{self.name}/loss": loss, **self.apply(loss, skip)}

    def apply(self, loss: Tensor | None = None, skip: Tensor | None = None) -> dict[str, Tensor]:
        """Clip, decay and step with the gradients already in `.grad`; skipped (see the class)
        when the gradient norm, or the `loss` if given, is not finite, or `skip` is nonzero."""
        bad_loss = None if loss is None else ~torch.isfinite(loss)
        if self.collective.active:
            bad_loss = self._average_gradients(bad_loss)
        grads = [p for p in self.params if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
        nonfinite = ~torch.isfinite(norm)
        if bad_loss is not None:
            nonfinite = nonfinite | bad_loss
        if self.params:
            nonfinite = nonfinite.to(self.params[0].device)
        bad = nonfinite if skip is None else nonfinite | (skip.to(nonfinite.device) != 0)
        if self.fused:
            self.adam.grad_scale = None
            self.adam.found_inf = bad.to(torch.float32)  # fused Adam skips, and undoes its step-count increment
            if self.weight_decay:
                with torch.no_grad():
                    torch._foreach_mul_(self.params, torch.where(bad, 1.0, 1.0 - self.weight_decay))
            self.adam.step()
        elif not bool(bad):  # foreach Adam has no on-device skip: one host sync
            if self.weight_decay:
                with torch.no_grad():
                    torch._foreach_mul_(self.params, 1.0 - self.weight_decay)
            self.adam.step()
        return {f"{self.name}/grad_norm": norm.detach(), f"{self.name}/nonfinite": nonfinite.to(torch.float32)}

    def _average_gradients(self, bad_loss: Tensor | None) -> Tensor | None:
        """Every parameter's gradient averaged over the ranks, and whether any rank's loss was not
        finite (None if no loss was given)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        device = self.params[0].device if self.params else None
        flag = torch.zeros(1, device=device) if bad_loss is None else bad_loss.to(device, torch.float32).reshape(1)
        self.collective.mean_([*(p.grad for p in self.params), flag])
        return None if bad_loss is None else flag[0] > 0

    def state_dict(self) -> dict[str, Any]:
        return self.adam.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adam.load_state_dict(state)


def either(skip: Tensor | None, flag: Tensor) -> Tensor:
    """The running skip flag of an update (0-d float, 1.0: skip the steps from here on) once a
    step's own non-finite `flag` is included; None means nothing skipped so far."""
    return flag if skip is None else torch.maximum(skip, flag)


def _fused_adam_ok(params: list[nn.Parameter]) -> bool:
    """Fused Adam (one kernel for all parameters) where this build supports their device."""
    return bool(params) and all(p.is_floating_point() for p in params) and params[0].device.type in ("cpu", "cuda")


def lambda_return(reward: Tensor, value: Tensor, discount: Tensor | float, bootstrap: Tensor,
                  lambda_: float) -> Tensor:
    """TD(lambda) targets by the backward recursion (DreamerV2's form):

        R_t = r_t + d_t * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}),   v_H = R_H = bootstrap,

    where r_t, d_t and v_t are `reward[t]`, `discount[t]` and `value[t]` of state t (value[0] is
    not used). `reward, value [H, N]`, `discount [H, N]` or a float, `bootstrap [N]` -> `[H, N]`.
    """
    return _lambda_return(reward, torch.cat([value[1:], bootstrap.unsqueeze(0)], 0), discount, lambda_)


def _lambda_return(reward: Tensor, next_value: Tensor, discount: Tensor | float, lambda_: float) -> Tensor:
    """`lambda_return` given next_value[t] = v_{t+1} `[H, N]` (its last row is the bootstrap).
    Always in float32: under bf16 autocast the rewards and values come out in bfloat16, whose 8-bit
    mantissa would round a sum over 15 steps, and with it every advantage and critic target."""
    reward, next_value = reward.float(), next_value.float()
    if isinstance(discount, Tensor):
        discount = discount.float()
    inputs = reward + discount * (1.0 - lambda_) * next_value  # [H, N]
    carry = discount * lambda_
    returns = []
    last = next_value[-1]
    for t in reversed(range(reward.shape[0])):
        last = inputs[t] + (carry if isinstance(carry, float) else carry[t]) * last
        returns.append(last)
    return torch.stack(returns[::-1])


RewardFn = Callable[[Trajectory], Tensor]
"""reward_fn(trajectory) -> reward [H + 1, N], reward[t] of state t."""


class ActorCritic(nn.Module):
    """Actor (MLP -> truncated normal), critic (MLP -> mean of a unit-variance Gaussian), slow
    target critic, and their two optimizers. Inputs are `feat` or `concat(feat, condition)`.

    `entropy_scale` (initialised from `cfg.actor_entropy`) may be changed between updates, e.g.
    for fine-tuning. `state_dict()` holds the networks, the update counter (a buffer) and, as the
    module's extra state, both optimizers' states; create the module on its final device.
    """

    def __init__(self, feat_dim: int, action_dim: int, cfg: ActorCriticConfig, condition_dim: int = 0,
                 name: str = "actor_critic", collective: Collective = SOLO) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.action_dim = action_dim
        self.condition_dim = condition_dim
        self.entropy_scale = cfg.actor_entropy
        in_dim = feat_dim + condition_dim
        self.actor = MLP(in_dim, 2 * action_dim, cfg.units, cfg.layers, norm=False)
        self.critic = MLP(in_dim, 1, cfg.units, cfg.layers, norm=False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self._updates = 0  # host-side mirror of `updates`, so scheduling needs no device sync
        self.register_load_state_dict_post_hook(_sync_update_counter)
        self.actor_opt = Optimizer(self.actor.parameters(), cfg.actor_lr, cfg.eps, cfg.grad_clip,
                                   cfg.weight_decay, name=f"{name}/actor", collective=collective)
        self.critic_opt = Optimizer(self.critic.parameters(), cfg.critic_lr, cfg.eps, cfg.grad_clip,
                                    cfg.weight_decay, name=f"{name}/critic", collective=collective)

    def get_extra_state(self) -> dict[str, Any]:
        return {"actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])

    def _input(self, feat: Tensor, condition: Tensor | None) -> Tensor:
        """`feat [..., N, F]`, `condition [N, C]` -> `[..., N, F + C]`."""
        if (condition is None) != (self.condition_dim == 0):
            raise ValueError(f"{self.name} expects a condition of size {self.condition_dim}")
        if condition is None:
            return feat
        return torch.cat([feat, condition.expand(*feat.shape[:-1], condition.shape[-1])], -1)

    def policy(self, feat: Tensor, condition: Tensor | None = None) -> TruncatedNormal:
        """The action distribution at `feat [..., F]` (gradients flow as the caller allows)."""
        return TruncatedNormal.from_output(self.actor(self._input(feat, condition)), self.cfg.actor_min_std)

    @torch.no_grad()
    def act(self, feat: Tensor, condition: Tensor | None = None, sample: bool = True,
            generator: torch.Generator | None = None) -> Tensor:
        """Actions `[N, A]` for acting: a sample, or the mean when `sample` is False."""
        dist = self.policy(feat, condition)
        return dist.sample(generator) if sample else dist.mode

    def update(self, wm: WorldModel, start: State, reward_fn: RewardFn, condition: Tensor | None = None,
               generator: torch.Generator | None = None,
               skip: Tensor | None = None) -> tuple[Trajectory, dict[str, Tensor]]:
        """One actor and one critic step on a rollout imagined from `start` (any leading dims,
        flattened to [N], detached), with the condition `[N, C]` held for the whole rollout.

        Indexing (H = horizon; trajectory states 0..H; action[t] taken at state t):
        - reward = reward_fn(trajectory) `[H + 1, N]`; value = target critic of every state;
        - target = lambda_return(reward[:-1], value[:-1], discount, bootstrap=value[-1]) `[H, N]`,
          target[t] the lambda-return from state t (the reference's; reward[H] is not used);
        - weight[t] = discount ** t (cumulative product of [1, discount, ...]), `[H + 1]`;
        - actor loss = -mean(weight[:-2] * (target[1:] + entropy_scale * entropy[:-1])): the
          action at state t (t = 0..H-2) is scored by the return from the state it leads to,
          target[t + 1], differentiated through the dynamics (the reference's indexing); the
          entropy is the policy's at state t (un-truncated Normal);
        - critic loss = mean(weight[:-1] * 0.5 * (critic(sg(feat[:-1])) - sg(target))^2).
        The world model's parameters are frozen throughout (no gradients, no changes). The
        reward function's own modules are the caller's to freeze (`agents.nets.frozen`).
        Returns the trajectory (detached: the actor's backward pass has used its graph) and the
        metrics as detached 0-d tensors.

        Non-finite losses (see `Optimizer`): from the first non-finite step on, every step is
        skipped: the actor's when its loss or gradient is not finite or `skip` (a 0-d tensor,
        the caller's) is set; the critic's also when the actor's was non-finite; and the target
        critic is then left as it was. `{name}/actor/nonfinite` and `{name}/critic/nonfinite`
        report each step's own loss and gradient. `updates` counts every call.
        """
        cfg = self.cfg
        entropies: list[Tensor] = []

        def act_in_imagination(state: State, t: int) -> Tensor:
            dist = self.policy(wm.rssm.feature(state), condition)  # state is detached here
            entropies.append(dist.entropy())
            return dist.sample(generator)

        with frozen(wm):
            traj = imagine(wm, start, act_in_imagination, cfg.horizon, generator)
            reward = reward_fn(traj)  # [H + 1, N]
            if reward.shape != traj.feat.shape[:2]:
                raise ValueError(f"reward_fn returned {tuple(reward.shape)}, expected {tuple(traj.feat.shape[:2])}")
            # The critics run one imagined step at a time: the same products as one batched call,
            # but every activation stays small (cache-sized, and no fresh pages to fault in).
            # The targets need the target critic's values of states 1..H only (v_0 is never used).
            feats = traj.feat.unbind(0)
            next_value = torch.stack([self.target_critic(self._input(f, condition)) for f in feats[1:]]).squeeze(-1)
            target = _lambda_return(reward[:-1], next_value, cfg.discount, cfg.lambda_)  # [H, N]
            weight = cfg.discount ** torch.arange(cfg.horizon + 1, device=reward.device, dtype=torch.float32)
            entropy = torch.stack(entropies)  # [H, N]
            objective = target[1:]
            if self.entropy_scale:
                objective = objective + self.entropy_scale * entropy[:-1]
            actor_loss = -(weight[:-2, None] * objective).mean()
            actor_metrics = self.actor_opt.step(actor_loss, skip)
            skip = either(skip, actor_metrics[f"{self.name}/actor/nonfinite"])

            inputs = [self._input(f.detach(), condition) for f in feats[:-1]]
            prediction = torch.stack([self.critic(x) for x in inputs]).squeeze(-1)  # [H, N]
            critic_loss = (weight[:-1, None] * 0.5 * (prediction - target.detach()).square()).mean()
            critic_metrics = self.critic_opt.step(critic_loss, skip)
            skip = either(skip, critic_metrics[f"{self.name}/critic/nonfinite"])
        self._updates = update_slow_target(self.critic, self.target_critic, self.updates, cfg, self._updates, skip)

        with torch.no_grad():
            metrics = {
                **actor_metrics,
                **critic_metrics,
                f"{self.name}/reward_mean": reward.mean(),
                f"{self.name}/reward_std": reward.std(),
                f"{self.name}/target_mean": target.mean(),
                f"{self.name}/value_mean": prediction.mean(),
                f"{self.name}/actor_entropy": entropy.mean(),
            }
        return traj.detach(), {k: v.detach() for k, v in metrics.items()}


@torch.no_grad()
def update_slow_target(critic: nn.Module, target: nn.Module, updates: Tensor, cfg: ActorCriticConfig,
                       count: int | None = None, skip: Tensor | None = None) -> int:
    """Count an update and keep a slow target critic: at update 0 the critic is copied into the
    target, and every `slow_target_every` updates it is mixed in by `slow_target_fraction`.

    `updates` is the int64 counter buffer (incremented here); `count`, its value on the host,
    spares reading it back from the device. Returns the new count. `skip` (a 0-d tensor, 1.0
    when the critic's step of this update was skipped as non-finite) leaves the target exactly
    as it was, on the device; the update is still counted, so that the schedule needs no sync.
    """
    n = int(updates) if count is None else count
    if n % cfg.slow_target_every == 0:
        mix = 1.0 if n == 0 else cfg.slow_target_fraction
        if skip is not None:
            weight = (1.0 - skip) * mix  # 0-d: 0 leaves the target as it is, 1 copies exactly
            for t, s in zip(target.parameters(), critic.parameters()):
                t.lerp_(s, weight.to(t.dtype))
        else:
            for t, s in zip(target.parameters(), critic.parameters()):
                if mix == 1.0:
                    t.copy_(s)
                else:
                    t.lerp_(s, mix)
    updates.fill_(n + 1)
    return n + 1


def _sync_update_counter(module: nn.Module, incompatible_keys: Any) -> None:
    module._updates = int(module.updates)
