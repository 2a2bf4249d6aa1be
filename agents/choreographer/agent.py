"""The Choreographer agent, learner side: one `update(batch)` trains every network.

Pretraining update, all on the same batch and the same start states (the reference's order):
    1. world model (reconstruction + balanced KL; reward head on detached features)
    2. LBS predictor: regress the per-step KL[posterior || prior] from the posterior feature
    3. exploration actor-critic in imagination, reward = normalised LBS prediction
    4. skill auto-encoder on the posterior deterministic states (EMA codebook, code resampling)
    5. skill actor-critic in imagination, a uniformly random code held for the whole rollout,
       reward = k-NN particle entropy over all imagined deterministic states + code reward
Metric groups: `world_model/`, `explore/` (the LBS predictor, `explore/lbs/`, and the exploration
actor-critic), `codebook/` (the skill auto-encoder and its VQ codebook), `skill_ac/` (the skill
actor-critic), `meta/` (fine-tuning's meta-controller and executor), `time/` (seconds per part).
The rewards' parts are metrics of their own, means over the imagined states: `skill_ac/reward_knn`
and `skill_ac/reward_code` (the two terms of the skill reward; `skill_ac/reward_mean` is their sum)
and `explore/reward_raw` (the LBS prediction before the running normalisation that
`explore/reward_mean` is after).

Fine-tuning update (after `finetune_mode()`):
    1. world model, with a fresh reward head learning the task reward
    2. only once a batch has held a reward >= reward_gate (the "reward gate", called reward
       smoothing in the paper): the meta-controller and the skill actor (see meta.py)

Decisions on the reference's quirks (see docs/choreographer-decisions.md):
- Skills, code reward and k-NN entropy use the deterministic state h_t only (as the reference
  and the paper's appendix: "the input and target of the auto-encoder are the deterministic part").
- k-NN entropy: pooled over all skills and all H + 1 imagined steps, the point itself included,
  mean of the K clipped distances, no log (paper appendix B.1); computed exactly in chunks.
- The LBS predictor is trained on posterior features and queried on imagined (prior) features,
  as in the reference: the prior features are what the exploration policy will visit.
- Fine-tuning resets every optimiser and the reward head, as the reference's `init_from` does.
- The executor (skill actor) gets no entropy bonus in fine-tuning (the reference computes one
  and never uses it); the meta-controller's entropy bonus is `meta_entropy`.

NaN or infinite losses (see `ChoreographerAgent.update`): the update stops taking steps at its
first non-finite loss or gradient norm. That optimizer step and every later one of the update
are skipped, on the device (a running skip flag, no host sync); the steps before it had finite
losses and stand (a world-model loss that is not finite, e.g. from a NaN in the batch, skips the
whole update). The state kept outside optimizers follows the same flag, so that nothing absorbs
a NaN: the EMA codebook with its counters and code resampling (also guarded by the embeddings'
own finiteness), each slow target critic, and the exploration reward's running magnitude
(restored when the exploration actor-critic did not step). The update reports
`learner/nonfinite` = 1.0 if any loss or gradient was not finite.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from choreo import vocabulary as B
from choreo.agents.actor_critic import ActorCritic, Optimizer, either
from choreo.agents.choreographer.meta import MetaController
from choreo.agents.choreographer.rewards import RunningMagnitude, code_reward, knn_particle_reward
from choreo.agents.choreographer.skills import SkillAutoEncoder, skill_loss
from choreo.agents.collective import SOLO, Collective
from choreo.agents.config import AgentConfig
from choreo.agents.nets import MLP, LayerNormGRUCell, compile_forwards, frozen
from choreo.agents.timing import PartTimer
from choreo.agents.world_model import WorldModel, world_model_loss
from choreo.vocabulary import derive_seed

PRETRAIN, FINETUNE = "pretrain", "finetune"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Batches fetched from Ray's object store are read-only views. The update only reads them, and a
# copy would cost a pixel batch's 30 MB per update, so torch's warning about them is silenced.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class ChoreographerAgent(nn.Module):
    """Every network of Choreographer, its optimisers, counters and random generator.

    `state_dict()` holds all of it (optimiser states ride along as the submodules' extra state),
    so `load_state_dict` on a fresh agent continues exactly; it loads with
    `torch.load(weights_only=True)`.
    """

    SHAPE_KEYS = (
        "world_model.deter",
        "world_model.hidden",
        "world_model.stoch",
        "world_model.classes",
        "world_model.mlp_units",
        "world_model.mlp_layers",
        "world_model.cnn_depth",
        "actor_critic.units",
        "actor_critic.layers",
        "choreographer.num_codes",
        "choreographer.code_dim",
    )
    """Keys of `AgentConfig` (dotted, relative to it) that decide the shapes of this agent's tensors,
    together with the observation shape and action size. A snapshot whose tensors do not fit names
    those of them that differ (see `agents.registry.shape_keys`)."""

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: AgentConfig, seed: int = 0,
                 device: str | torch.device | None = "auto", profile: bool = False,
                 collective: Collective = SOLO) -> None:
        """collective: the learner group this agent trains in (`agents.collective`); every rank
        builds the same initial weights from `seed`, and draws its imagination noise from a
        generator of its own (rank 0's is seeded with `seed`, as a single learner's)."""
        super().__init__()
        self.cfg = cfg
        self.obs_shape = tuple(obs_shape)
        self.action_dim = action_dim
        self.device = resolve_device(device)
        self.timer = PartTimer(self.device if profile else None)
        self.collective = collective
        self.seed = seed if collective.rank == 0 else derive_seed(seed, "rank", collective.rank)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(self.seed)
        wm_cfg, ac_cfg, ch = cfg.world_model, cfg.actor_critic, cfg.choreographer
        # Parameter init draws from the global RNG; seed it locally and leave the caller's alone.
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(seed)
            self.wm = WorldModel(self.obs_shape, action_dim, wm_cfg)
            feat = self.wm.feat_dim
            self.lbs = MLP(feat, 1, wm_cfg.mlp_units, wm_cfg.mlp_layers, norm=False)
            self.explore_ac = ActorCritic(feat, action_dim, ac_cfg, name="explore", collective=collective)
            self.explore_norm = RunningMagnitude(ch.exploration_reward_momentum, collective=collective)
            self.skills = SkillAutoEncoder(wm_cfg.deter, ch, ac_cfg.units, ac_cfg.layers,
                                           generator=torch.Generator().manual_seed(seed), collective=collective)
            self.skill_ac = ActorCritic(feat, action_dim, ac_cfg, condition_dim=ch.num_codes, name="skill_ac",
                                        collective=collective)
            self.meta = MetaController(feat, ch.num_codes, ac_cfg, ch.meta_entropy, collective=collective)
        self.wm_opt = self._model_optimizer()
        self.lbs_opt = Optimizer(self.lbs.parameters(), wm_cfg.lr, wm_cfg.eps, wm_cfg.grad_clip,
                                 wm_cfg.weight_decay, name="explore/lbs", collective=collective)
        self.skill_opt = Optimizer(self.skills.parameters(), ch.skill_lr, ac_cfg.eps, ac_cfg.grad_clip,
                                   ac_cfg.weight_decay, name="codebook", collective=collective)
        self.executor_opt = self._executor_optimizer()
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=self.device))
        self.register_buffer("gate_open", torch.zeros((), dtype=torch.bool, device=self.device))
        self.register_buffer("finetuning", torch.zeros((), dtype=torch.bool, device=self.device))
        self.exploration = True  # the LBS predictor and exploration actor-critic train (see start_offline)
        self.to(self.device)
        self._autocast = _autocast_dtype(cfg.precision.autocast, self.device)
        if cfg.precision.compile:
            compile_forwards(self, (LayerNormGRUCell, MLP), cfg.precision.compile_mode)

    # ------------------------------------------------------------------ optimisers and modes

    def _model_optimizer(self) -> Optimizer:
        c = self.cfg.world_model
        return Optimizer(self.wm.parameters(), c.lr, c.eps, c.grad_clip, c.weight_decay, name="world_model",
                         collective=self.collective)

    def _executor_optimizer(self) -> Optimizer:
        c = self.cfg.actor_critic
        return Optimizer(self.skill_ac.actor.parameters(), c.actor_lr, c.eps, c.grad_clip, c.weight_decay,
                         name="executor", collective=self.collective)

    @property
    def mode(self) -> str:
        return FINETUNE if bool(self.finetuning) else PRETRAIN

    def finetune_mode(self) -> None:
        """Switch a pretrained agent to fine-tuning: a fresh reward head, a fresh meta-controller,
        fresh optimisers for the world model and the executor, the reward gate closed."""
        ac_cfg, ch = self.cfg.actor_critic, self.cfg.choreographer
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(int(torch.randint(2**31 - 1, (), generator=self.generator, device=self.device)))
            self.wm.reward = MLP(self.wm.feat_dim, 1, self.cfg.world_model.mlp_units,
                                 self.cfg.world_model.mlp_layers, norm=False)
            self.meta = MetaController(self.wm.feat_dim, ch.num_codes, ac_cfg, ch.meta_entropy,
                                       collective=self.collective)
        # Each rank drew its own fresh weights: all take rank 0's.
        self.collective.broadcast_([t for module in (self.wm.reward, self.meta)
                                    for t in module.state_dict().values() if isinstance(t, Tensor)])
        self.wm_opt = self._model_optimizer()
        self.executor_opt = self._executor_optimizer()
        self.finetuning.fill_(True)
        self.gate_open.fill_(False)

    def start_finetuning(self, pretrained: Mapping[str, Any] | None) -> None:
        """Fine-tuning's starting point: a pretrained agent's `state_dict()` (a snapshot's "agent"),
        or these random weights (None, fine-tuning from scratch); then `finetune_mode()`. The random
        generator restarts from this agent's seed, not the snapshot's (which may also come from
        another device), so that fine-tuning runs of one snapshot with different seeds differ."""
        if pretrained is not None:
            state = dict(pretrained)
            extra = dict(state.get("_extra_state", {}))
            extra["generator"] = self.generator.get_state()
            state["_extra_state"] = extra
            self.load_state_dict(state)
        self.generator.manual_seed(self.seed)
        self.finetune_mode()

    def start_offline(self) -> None:
        """Pretraining from a dataset alone (the reference's offline training): the world model,
        the skill auto-encoder and the skill actor-critic train; the LBS predictor and the
        exploration actor-critic do not, since nothing acts with them."""
        self.exploration = False

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "world_model_opt": self.wm_opt.state_dict(),
            "lbs_opt": self.lbs_opt.state_dict(),
            "skill_opt": self.skill_opt.state_dict(),
            "executor_opt": self.executor_opt.state_dict(),
            "generator": self.generator.get_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.wm_opt.load_state_dict(state["world_model_opt"])
        self.lbs_opt.load_state_dict(state["lbs_opt"])
        self.skill_opt.load_state_dict(state["skill_opt"])
        self.executor_opt.load_state_dict(state["executor_opt"])
        self.generator.set_state(state["generator"].cpu())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        # A fine-tuning checkpoint holds a fresh reward head and meta-controller and the states of
        # fresh optimisers: switch first, so that the optimisers loaded below are those.
        if bool(state_dict.get("finetuning", False)) and not bool(self.finetuning):
            self.finetune_mode()
        return super().load_state_dict(state_dict, strict, assign)

    # ------------------------------------------------------------------ updates

    def _tensors(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        def convert(v: Any) -> Tensor:
            t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            return t.to(self.device, non_blocking=True)

        out = {k: convert(batch[k]) for k in (B.OBSERVATION, B.ACTION, B.REWARD, B.IS_FIRST)}
        out[B.ACTION] = out[B.ACTION].float()
        out[B.REWARD] = out[B.REWARD].float()
        out[B.IS_FIRST] = out[B.IS_FIRST].bool()
        return out

    def _precision(self) -> contextlib.AbstractContextManager:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast)

    def update(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One learner update on a batch `[B, T, ...]` (numpy or torch; keys from choreo.vocabulary).
        Returns flat metrics as floats (one device sync at the end).

        `learner/nonfinite` is 1.0 when any loss or gradient norm of this update was NaN or
        infinite (`<optimizer>/nonfinite` says which): the steps from the first such one on were
        skipped, and no state outside the optimizers absorbed the non-finite values (see the
        module's docstring). Otherwise 0.0. What an update skipped from its first step (a
        non-finite world-model loss) still changes: the random generator's state (the draws
        happened) and the actor-critics' and meta-controller's `updates` call counters (their
        slow-target schedules count calls, without a host sync); `updates` here, the skill
        auto-encoder's counter and every parameter, buffer and optimizer moment stay as they
        were (a first-ever step creates Adam's zeroed state). `updates` here counts the updates
        without any non-finite loss.
        """
        data = self._tensors(batch)
        self.timer.reset()
        with self._precision():
            if self.mode == FINETUNE:
                metrics = self._finetune_update(data)
            else:
                metrics = self._pretrain_update(data)
        flags = [v for k, v in metrics.items() if k.endswith("/nonfinite")]
        nonfinite = torch.stack(flags).amax() if flags else torch.zeros((), device=self.device)
        metrics["learner/nonfinite"] = nonfinite
        self.updates.add_((nonfinite == 0).to(self.updates.dtype))  # counts the fully finite updates
        # One device-to-host transfer for all metrics, not one synchronisation per metric.
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                              for v in metrics.values()])
        self.collective.mean_([values])  # several learners: every rank reports the group's means
        values = values.tolist()
        out = dict(zip(metrics, values))
        out.update(self.timer.metrics())
        return out

    def _world_model_step(self, data: dict[str, Tensor]):
        with self.timer("world_model"):
            loss, metrics, out = world_model_loss(self.wm, data, generator=self.generator)
            metrics.update(self.wm_opt.step(loss))
        return metrics, out

    def _pretrain_update(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        ch = self.cfg.choreographer
        metrics, out = self._world_model_step(data)
        skip = metrics["world_model/nonfinite"]  # the running skip flag (see the module's docstring)
        start = out.post.detach()
        feat = out.feat.detach()

        if self.exploration:
            skip = self._exploration_step(out, feat, metrics, skip)

        with self.timer("skill_autoencoder"):
            deter = start.deter.flatten(0, -2)  # [B * T, deter]
            loss, m, aux = skill_loss(self.skills, deter)
            metrics.update(m)
            metrics.update(self.skill_opt.step(loss, skip))
            skip = either(skip, metrics["codebook/nonfinite"])
            metrics.update(self.skills.codebook_step(aux["z_e"], aux["indices"], self.generator, skip=skip))

        with self.timer("skill_actor_critic"):
            n = deter.shape[0]
            index = torch.randint(ch.num_codes, (n,), generator=self.generator, device=self.device)
            code = F.one_hot(index, ch.num_codes).float()  # [N, K], held for the whole rollout
            with torch.no_grad():
                target_deter = self.skills.decode_code(code)  # [N, deter]

            def skill_reward(traj):
                deter_traj = traj.state.deter  # [H + 1, N, deter]
                with self.timer("knn_reward"):
                    entropy = self._knn_reward(deter_traj.detach().flatten(0, 1).float()).view(deter_traj.shape[:2])
                code_term = code_reward(target_deter, deter_traj)
                # The two terms apart, as means over the imagined states (device tensors: no sync here).
                metrics["skill_ac/reward_knn"] = entropy.detach().float().mean()
                metrics["skill_ac/reward_code"] = code_term.detach().float().mean()
                return entropy + code_term

            with frozen(self.skills):
                _, m = self.skill_ac.update(self.wm, start, skill_reward, condition=code, generator=self.generator,
                                            skip=skip)
            metrics.update(m)
        return metrics

    def _knn_reward(self, particles: Tensor) -> Tensor:
        """The k-NN entropy reward of this rank's imagined states `[N, deter]`: among themselves
        (one learner, or `knn_pool: rank`), or among every rank's (`knn_pool: global`)."""
        ch = self.cfg.choreographer
        rows = None
        if self.collective.active and ch.knn_pool == "global":
            n = particles.shape[0]
            rows = (self.collective.rank * n, (self.collective.rank + 1) * n)
            particles = self.collective.gather(particles)
        return knn_particle_reward(particles, ch.knn_k, ch.knn_clip, ch.knn_chunk, ch.knn_bf16, rows=rows)

    def _exploration_step(self, out: Any, feat: Tensor, metrics: dict[str, Tensor], skip: Tensor) -> Tensor:
        """LBS predictor and exploration actor-critic; returns the running skip flag."""
        start = out.post.detach()
        with self.timer("exploration"):
            lbs_loss = 0.5 * (self.lbs(feat).squeeze(-1) - out.kl).square().mean()
            metrics.update(self.lbs_opt.step(lbs_loss, skip))
            skip = either(skip, metrics["explore/lbs/nonfinite"])

            def exploration_reward(traj):
                # Gradients flow through the predictor into the imagined features (dynamics
                # backpropagation), its parameters stay fixed.
                raw = self.lbs(traj.feat).squeeze(-1)  # [H + 1, N], the predicted KL before normalising
                metrics["explore/reward_raw"] = raw.detach().float().mean()
                return self.explore_norm(raw)

            mag_before = self.explore_norm.mag.clone()
            with frozen(self.lbs):
                _, m = self.explore_ac.update(self.wm, start, exploration_reward, generator=self.generator, skip=skip)
            metrics.update(m)
            skip = either(either(skip, m["explore/actor/nonfinite"]), m["explore/critic/nonfinite"])
            with torch.no_grad():  # the magnitude follows the actor-critic: restored if it did not step
                self.explore_norm.mag.copy_(torch.where(skip > 0, mag_before, self.explore_norm.mag))
            metrics["explore/reward_magnitude"] = self.explore_norm.mag.detach()
        return skip

    def _finetune_update(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        metrics, out = self._world_model_step(data)
        if not bool(self.gate_open):
            # Until a real reward shows up, the predicted rewards are noise around zero, and
            # training on them would collapse the pretrained skills. Any rank's batch opens it for all.
            if bool(self.collective.any((data[B.REWARD] >= self.cfg.choreographer.reward_gate).any())):
                self.gate_open.fill_(True)
        metrics["meta/gate_open"] = self.gate_open.float()
        if bool(self.gate_open):
            with self.timer("meta_controller"):
                executor_opt = None if self.cfg.finetune.freeze_skills else self.executor_opt
                metrics.update(self.meta.update(self.wm, self.skill_ac, executor_opt, out.post.detach(),
                                                self.generator, skip=metrics["world_model/nonfinite"]))
        return metrics

    # ------------------------------------------------------------------ acting weights

    def policy_weights(self) -> dict[str, np.ndarray]:
        """What acting needs, as numpy arrays: encoder, RSSM, the three actors, the gate flag."""
        parts = {
            "encoder": self.wm.encoder,
            "rssm": self.wm.rssm,
            "explore_actor": self.explore_ac.actor,
            "skill_actor": self.skill_ac.actor,
            "meta_actor": self.meta.actor,
        }
        weights = {
            f"{prefix}.{name}": t.detach().to("cpu", torch.float32).numpy().copy()
            for prefix, module in parts.items()
            for name, t in module.state_dict().items()
        }
        weights["gate_open"] = np.array(bool(self.gate_open))
        return weights


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "bf16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
