"""The meta-controller of fine-tuning: a policy over skill codes trained in imagination on the
learned task reward, which also fine-tunes the skill actor through the dynamics.

Per imagined step t (the reference's "skill_len = 1": a code is drawn at every step):
    z_t ~ pi_meta(. | sg(feat_t)),   a_t ~ pi_skill(. | sg(feat_t), sg(z_t)),   s_{t+1} = prior(s_t, a_t)
    reward[t] = reward head(feat_t)                      (the task reward predictor)
    target    = lambda-return with the meta critic's slow target as value
    meta actor: REINFORCE  -mean(w[:-2] * (log pi_meta(z_t | feat_t) * sg(target[t+1] - V_slow(feat_t))
                                            + entropy_scale * H(pi_meta(. | feat_t))))
    executor (skill actor): dynamics backprop  -mean(w[:-2] * target[t+1])
    meta critic: squared error to sg(target) on sg(feat[:-1])
The code given to the skill actor is a stop-gradient one-hot, so the two actors' losses have
separate graphs. The world model is frozen throughout.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from choreo.agents.actor_critic import ActorCritic, Optimizer, either, lambda_return, update_slow_target
from choreo.agents.collective import SOLO, Collective
from choreo.agents.config import ActorCriticConfig
from choreo.agents.distributions import CodeCategorical
from choreo.agents.nets import MLP, frozen
from choreo.agents.world_model import State, WorldModel, imagine


class MetaController(nn.Module):
    """Categorical actor over `num_codes` skills and a critic, both on the model feature."""

    def __init__(self, feat_dim: int, num_codes: int, cfg: ActorCriticConfig, entropy_scale: float,
                 collective: Collective = SOLO) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_codes = num_codes
        self.entropy_scale = entropy_scale
        self.actor = MLP(feat_dim, num_codes, cfg.units, cfg.layers, norm=False)
        self.critic = MLP(feat_dim, 1, cfg.units, cfg.layers, norm=False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.actor_opt = Optimizer(self.actor.parameters(), cfg.actor_lr, cfg.eps, cfg.grad_clip,
                                   cfg.weight_decay, name="meta/actor", collective=collective)
        self.critic_opt = Optimizer(self.critic.parameters(), cfg.critic_lr, cfg.eps, cfg.grad_clip,
                                    cfg.weight_decay, name="meta/critic", collective=collective)

    def get_extra_state(self) -> dict[str, Any]:
        return {"actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])

    def policy(self, feat: Tensor) -> CodeCategorical:
        return CodeCategorical(self.actor(feat))

    def update(self, wm: WorldModel, skill_ac: ActorCritic, executor_opt: Optimizer | None, start: State,
               generator: torch.Generator | None = None, skip: Tensor | None = None) -> dict[str, Tensor]:
        """One step of the meta actor, the executor (skill actor) and the meta critic; with
        `executor_opt` None the skill actor is not trained (frozen skills).

        Non-finite losses (see `Optimizer`): with `skip` set (a 0-d tensor, the caller's running
        flag) every step is skipped. Otherwise the meta actor and the executor, whose losses
        come from the same rollout and do not depend on each other's step, are each skipped when
        their own loss or gradient is not finite, and the critic's step when any of the three is;
        the slow target critic is then left as it was. `executor_opt` may be any object with
        `step(loss)` when `skip` is None."""
        cfg = self.cfg
        log_probs: list[Tensor] = []
        entropies: list[Tensor] = []
        codes: list[Tensor] = []

        def act(state: State, t: int) -> Tensor:
            feat = wm.rssm.feature(state)  # detached input
            meta = self.policy(feat)
            code = meta.sample(generator)  # one-hot [N, K], no gradient
            log_probs.append(meta.log_prob(code))
            entropies.append(meta.entropy())
            codes.append(code)
            return skill_ac.policy(feat, code).sample(generator)

        with frozen(wm):
            traj = imagine(wm, start, act, cfg.horizon, generator)
            reward = wm.reward(traj.feat).squeeze(-1)  # [H + 1, N], differentiable w.r.t. actions
            value = self.target_critic(traj.feat).squeeze(-1)  # [H + 1, N]
            target = lambda_return(reward[:-1], value[:-1], cfg.discount, value[-1], cfg.lambda_)  # [H, N]
            weight = cfg.discount ** torch.arange(cfg.horizon + 1, device=value.device, dtype=torch.float32)

            log_prob = torch.stack(log_probs)[:-1]  # [H - 1, N]: codes at states 0..H-2
            entropy = torch.stack(entropies)[:-1]
            advantage = (target[1:] - value[:-2].float()).detach()  # float32 (see lambda_return)
            meta_objective = log_prob * advantage + self.entropy_scale * entropy
            meta_loss = -(weight[:-2, None] * meta_objective).mean()
            metrics = self.actor_opt.step(meta_loss, skip)
            if executor_opt is not None:
                executor_loss = -(weight[:-2, None] * target[1:]).mean()
                executor = executor_opt.step(executor_loss) if skip is None else executor_opt.step(executor_loss, skip)
                metrics.update({f"meta/executor/{k.split('/')[-1]}": v for k, v in executor.items()})
            for flag in ("meta/actor/nonfinite", "meta/executor/nonfinite"):
                if flag in metrics:
                    skip = either(skip, metrics[flag])

            prediction = self.critic(traj.feat[:-1].detach()).squeeze(-1)  # [H, N]
            critic_loss = (weight[:-1, None] * 0.5 * (prediction - target.detach()).square()).mean()
            metrics.update(self.critic_opt.step(critic_loss, skip))
            skip = either(skip, metrics["meta/critic/nonfinite"])
        update_slow_target(self.critic, self.target_critic, self.updates, cfg, skip=skip)

        with torch.no_grad():
            used = torch.stack(codes).sum((0, 1))
            metrics.update({
                "meta/reward_mean": reward.mean(),
                "meta/target_mean": target.mean(),
                "meta/value_mean": prediction.mean(),
                "meta/entropy": entropy.mean(),
                "meta/codes_used": (used > 0).sum().to(reward.dtype),
            })
        return {k: v.detach() for k, v in metrics.items()}
