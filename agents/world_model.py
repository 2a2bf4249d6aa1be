"""DreamerV2-style world model: a recurrent state-space model (RSSM) with discrete latents, an
observation encoder/decoder, a reward head, the balanced-KL training loss, and imagination.

Conventions (see choreo/vocabulary.py): `action[t]` is the action that LED TO `observation[t]`; the
posterior at step t is computed from the previous state, `action[t]` and `observation[t]`.
Every state tensor has the same leading dims, e.g. `[B, T]` for a sequence batch or `[N]` for a
batch of imagination starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from choreo.vocabulary import ACTION, IS_FIRST, OBSERVATION, REWARD
from choreo.agents.config import WorldModelConfig
from choreo.agents.distributions import OneHotStraightThrough
from choreo.agents.nets import MLP, ConvDecoder, ConvEncoder, LayerNormGRUCell


@dataclass(frozen=True)
class State:
    """An RSSM state. Indexing, reshaping and stacking act on the leading dims only."""

    deter: Tensor
    """[..., deter] the GRU's deterministic state h_t."""
    stoch: Tensor
    """[..., stoch, classes] one-hot samples of the categorical latents (straight-through)."""
    logits: Tensor
    """[..., stoch, classes] logits of the distribution `stoch` was sampled from."""

    @property
    def shape(self) -> torch.Size:
        """The leading dims."""
        return self.deter.shape[:-1]

    def map(self, fn: Callable[[Tensor], Tensor]) -> State:
        return State(fn(self.deter), fn(self.stoch), fn(self.logits))

    def __getitem__(self, index) -> State:
        return State(self.deter[index], self.stoch[index], self.logits[index])

    def detach(self) -> State:
        return self.map(Tensor.detach)

    def reshape(self, *shape: int) -> State:
        """New leading dims, e.g. `state.reshape(B, T)`."""
        return State(
            self.deter.reshape(*shape, self.deter.shape[-1]),
            self.stoch.reshape(*shape, *self.stoch.shape[-2:]),
            self.logits.reshape(*shape, *self.logits.shape[-2:]),
        )

    def flatten(self) -> State:
        """All leading dims merged into one: `[B, T, ...] -> [B * T, ...]`."""
        return self.reshape(-1)

    @staticmethod
    def stack(states: Sequence[State], dim: int = 0) -> State:
        """A new leading dim at position `dim` (counted among the leading dims, >= 0)."""
        if dim < 0:
            raise ValueError("stack a State along a non-negative dim")
        return State(
            torch.stack([s.deter for s in states], dim),
            torch.stack([s.stoch for s in states], dim),
            torch.stack([s.logits for s in states], dim),
        )


class RSSM(nn.Module):
    """DreamerV2's RSSM with `stoch` categorical latents of `classes` classes each.

    img_in: Linear(stoch * classes + A -> hidden) + ELU; GRU: LayerNorm GRU cell of size `deter`;
    prior: Linear(deter -> hidden) + ELU + Linear(-> stoch * classes);
    posterior: Linear(deter + embed -> hidden) + ELU + Linear(-> stoch * classes).
    The initial state is all zeros; `is_first` zeroes the previous state and the previous action.
    """

    def __init__(self, embed_dim: int, action_dim: int, cfg: WorldModelConfig) -> None:
        super().__init__()
        self.deter, self.stoch, self.classes = cfg.deter, cfg.stoch, cfg.classes
        self.action_dim = action_dim
        latent = cfg.stoch * cfg.classes
        self.img_in = nn.Linear(latent + action_dim, cfg.hidden)
        self.gru = LayerNormGRUCell(cfg.hidden, cfg.deter)
        self.prior_hidden = nn.Linear(cfg.deter, cfg.hidden)
        self.prior_out = nn.Linear(cfg.hidden, latent)
        self.post_hidden = nn.Linear(cfg.deter + embed_dim, cfg.hidden)
        self.post_out = nn.Linear(cfg.hidden, latent)

    @property
    def feat_dim(self) -> int:
        return self.stoch * self.classes + self.deter

    def initial(self, batch_size: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> State:
        """The all-zeros state `[batch_size, ...]`."""
        deter = torch.zeros(batch_size, self.deter, device=device, dtype=dtype)
        stoch = torch.zeros(batch_size, self.stoch, self.classes, device=device, dtype=dtype)
        return State(deter, stoch, torch.zeros_like(stoch))

    def feature(self, state: State) -> Tensor:
        """`[..., stoch * classes + deter]`: the flattened one-hot latents, then h_t."""
        return torch.cat([state.stoch.flatten(-2), state.deter], -1)

    def _latent_shape(self, flat: Tensor) -> Tensor:
        return flat.unflatten(-1, (self.stoch, self.classes))

    def prior_logits(self, deter: Tensor) -> Tensor:
        """`[..., deter] -> [..., stoch, classes]`."""
        return self._latent_shape(self.prior_out(F.elu(self.prior_hidden(deter))))

    def _recur(self, prev_state: State, action: Tensor) -> Tensor:
        """The next deterministic state `[N, deter]` from `prev_state [N]` and `action [N, A]`."""
        # img_in on concat(stoch, action), computed as two products to skip the concatenation.
        latent = self.stoch * self.classes
        weight = self.img_in.weight
        x = F.linear(action, weight[:, latent:], self.img_in.bias)
        x = x + F.linear(prev_state.stoch.flatten(-2), weight[:, :latent])
        return self.gru(F.elu(x), prev_state.deter)

    def img_step(self, prev_state: State, action: Tensor, generator: torch.Generator | None = None) -> State:
        """One prior step: `prev_state [N]`, `action [N, A]` (taken at prev_state) -> prior `[N]`."""
        deter = self._recur(prev_state, action)
        logits = self.prior_logits(deter)
        return State(deter, OneHotStraightThrough(logits).sample(generator), logits)

    def obs_step(self, prev_state: State, prev_action: Tensor, embed: Tensor, is_first: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[State, State]:
        """One filtering step: `prev_state [N]`, `prev_action [N, A]` (the action that led to this
        observation), `embed [N, E]`, `is_first [N]` bool -> (posterior, prior), both `[N]`."""
        post = self.posterior_step(prev_state, prev_action, embed, is_first, generator)
        prior_logits = self.prior_logits(post.deter)
        return post, State(post.deter, OneHotStraightThrough(prior_logits).sample(generator), prior_logits)

    def posterior_step(self, prev_state: State, prev_action: Tensor, embed: Tensor, is_first: Tensor | None = None,
                       generator: torch.Generator | None = None, sample: bool = True) -> State:
        """`obs_step` without the prior, which filtering for acting never reads (the prior head and
        its sample are about a fifth of an acting step). sample=False: the latent is the mode of
        each categorical (the one-hot argmax of its logits) instead of a sample, and `generator` is
        not drawn from, so that filtering is a deterministic function of the observations."""
        if is_first is not None:
            keep = (~is_first.bool()).to(prev_state.deter.dtype).unsqueeze(-1)  # [N, 1]
            prev_state = State(prev_state.deter * keep, prev_state.stoch * keep.unsqueeze(-1),
                               prev_state.logits * keep.unsqueeze(-1))
            prev_action = prev_action * keep
        deter = self._recur(prev_state, prev_action)
        hidden = F.elu(self.post_hidden(torch.cat([deter, embed], -1)))
        logits = self._latent_shape(self.post_out(hidden))
        dist = OneHotStraightThrough(logits)
        return State(deter, dist.sample(generator) if sample else dist.mode, logits)

    def observe(self, embed: Tensor, action: Tensor, is_first: Tensor, state: State | None = None,
                generator: torch.Generator | None = None) -> tuple[State, State]:
        """Filter a sequence: `embed [B, T, E]`, `action [B, T, A]`, `is_first [B, T]` bool, optional
        start `state [B]` (default: initial) -> (posterior, prior), both `[B, T, ...]`.

        The same computation as `obs_step` applied T times, arranged for speed: the action and
        embedding parts of the two input layers are projected for all steps at once (the layers'
        weight matrices are split by input columns), and the prior head, which does not feed the
        recurrence, runs once on all T deterministic states after the loop.
        """
        batch, length = embed.shape[:2]
        dtype = embed.dtype
        if state is None:
            state = self.initial(batch, embed.device, dtype)
        latent = self.stoch * self.classes
        keep = (~is_first.bool()).to(dtype).transpose(0, 1).unsqueeze(-1)  # [T, B, 1]
        # Per-sequence input projections, time-major [T, B, hidden]; the bias rides along here.
        img_w, post_w = self.img_in.weight, self.post_hidden.weight
        action_in = F.linear(action.transpose(0, 1) * keep, img_w[:, latent:], self.img_in.bias)
        embed_in = F.linear(embed.transpose(0, 1), post_w[:, self.deter:], self.post_hidden.bias)
        img_w_stoch = img_w[:, :latent].t()  # [latent, hidden]
        post_w_deter = post_w[:, :self.deter].t()  # [deter, hidden]

        deter, stoch = state.deter, state.stoch.flatten(-2)  # [B, deter], [B, latent]
        deters, stochs, logits_all = [], [], []
        for t in range(length):
            deter, stoch = deter * keep[t], stoch * keep[t]
            x = F.elu(torch.addmm(action_in[t], stoch, img_w_stoch))
            deter = self.gru(x, deter)
            hidden = F.elu(torch.addmm(embed_in[t], deter, post_w_deter))
            logits = self._latent_shape(self.post_out(hidden))  # [B, stoch, classes]
            stoch = OneHotStraightThrough(logits).sample(generator).flatten(-2)
            deters.append(deter)
            stochs.append(stoch)
            logits_all.append(logits)
        deter = torch.stack(deters, 1)  # [B, T, deter]
        post = State(deter, self._latent_shape(torch.stack(stochs, 1)), torch.stack(logits_all, 1))
        prior_logits = self.prior_logits(deter)  # [B, T, stoch, classes]
        prior = State(deter, OneHotStraightThrough(prior_logits).sample(generator), prior_logits)
        return post, prior


def preprocess_observation(obs: Tensor, pixels: bool) -> Tensor:
    """Observations as network inputs and decoder targets: uint8 pixels -> float / 255 - 0.5,
    states -> float32."""
    if pixels:
        return obs.to(torch.float32) / 255.0 - 0.5
    return obs.to(torch.float32)


def build_encoder(obs_shape: tuple[int, ...], cfg: WorldModelConfig) -> nn.Module:
    """The observation encoder (with `.out_dim`): an MLP with LayerNorm for `(D,)` states, the
    conv encoder for `(C, 64, 64)` pixels. Acting policies build theirs here to load the
    learner's `encoder` weights."""
    obs_shape = tuple(obs_shape)
    if len(obs_shape) == 3:
        if obs_shape[1:] != (64, 64):
            raise ValueError(f"pixel observations must be (C, 64, 64), got {obs_shape}")
        return ConvEncoder(cfg.cnn_depth, in_channels=obs_shape[0])
    if len(obs_shape) == 1:
        return MLP(obs_shape[0], None, cfg.mlp_units, cfg.mlp_layers, norm=True)
    raise ValueError(f"observations must be (D,) or (C, 64, 64), got {obs_shape}")


class WorldModel(nn.Module):
    """Encoder + RSSM + decoder + reward head.

    `obs_shape` is `(D,)` for state observations (MLP encoder with LayerNorm, embed = mlp_units) or
    `(C, 64, 64)` for uint8 pixels (conv encoder, embed = 8 * cnn_depth * 4; inputs scaled to
    [-0.5, 0.5]). The decoder and the reward head are means of unit-variance Gaussians. With
    `cfg.reward_grad` False (the reference) the reward head is trained on detached features and so
    never shapes the representation.
    """

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: WorldModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.obs_shape = tuple(obs_shape)
        self.action_dim = action_dim
        self.pixels = len(self.obs_shape) == 3
        feat_dim = cfg.stoch * cfg.classes + cfg.deter
        self.encoder = build_encoder(self.obs_shape, cfg)
        if self.pixels:
            self.decoder: nn.Module = ConvDecoder(feat_dim, cfg.cnn_depth, out_channels=self.obs_shape[0])
        else:
            self.decoder = MLP(feat_dim, self.obs_shape[0], cfg.mlp_units, cfg.mlp_layers, norm=True)
        self.rssm = RSSM(self.encoder.out_dim, action_dim, cfg)
        self.reward = MLP(feat_dim, 1, cfg.mlp_units, cfg.mlp_layers, norm=False)

    @property
    def feat_dim(self) -> int:
        return self.rssm.feat_dim

    def preprocess(self, obs: Tensor) -> Tensor:
        """Observations as the float targets of the decoder: uint8 pixels -> /255 - 0.5."""
        return preprocess_observation(obs, self.pixels)

    def encode(self, obs: Tensor) -> Tensor:
        """`[..., *obs_shape] -> [..., embed]`."""
        return self.encoder(self.preprocess(obs))


@dataclass(frozen=True)
class WorldModelOutput:
    """What a world-model loss computed, for the updates that follow on the same batch."""

    post: State
    """[B, T, ...] posterior states (imagination starts; with gradients, detach as needed)."""
    prior: State
    """[B, T, ...] prior states."""
    feat: Tensor
    """[B, T, feat] posterior features (with gradients)."""
    kl: Tensor
    """[B, T] KL[post || prior] summed over the latents, detached and without free nats."""


def kl_balance_loss(post_logits: Tensor, prior_logits: Tensor, balance: float, free: float) -> tuple[Tensor, Tensor]:
    """DreamerV2 KL balancing with free nats on the batch mean.

    loss = balance * max(mean KL[sg(post) || prior], free) + (1 - balance) * max(mean KL[post || sg(prior)], free),
    each KL summed over the categorical variables. `[..., S, K]` logits -> (loss, kl `[...]` with
    gradients). Both KLs have the same value; they differ only in where gradients go.
    """
    post_lp = torch.log_softmax(post_logits.float(), -1)
    prior_lp = torch.log_softmax(prior_logits.float(), -1)
    post_p = post_lp.exp()
    kl = (post_p * (post_lp - prior_lp)).sum((-2, -1))
    kl_prior_side = (post_p.detach() * (post_lp.detach() - prior_lp)).sum((-2, -1)).mean()
    kl_post_side = (post_p * (post_lp - prior_lp.detach())).sum((-2, -1)).mean()
    loss = balance * kl_prior_side.clamp_min(free) + (1.0 - balance) * kl_post_side.clamp_min(free)
    return loss, kl


def world_model_loss(wm: WorldModel, batch: dict[str, Tensor], state: State | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor], WorldModelOutput]:
    """The world model's training loss on a sequence batch (keys from choreo.vocabulary).

    loss = balanced KL + obs NLL + reward NLL, where the NLLs of unit-variance Gaussians are taken
    without their constants: 0.5 * squared error summed over observation dims, mean over B, T.
    The reward head sees detached features unless `wm.cfg.reward_grad`.
    Returns (loss, metrics as detached 0-d tensors, WorldModelOutput).
    """
    obs = wm.preprocess(batch[OBSERVATION])  # [B, T, *obs_shape]
    embed = wm.encoder(obs)  # [B, T, E]
    post, prior = wm.rssm.observe(embed, batch[ACTION], batch[IS_FIRST], state, generator)
    feat = wm.rssm.feature(post)  # [B, T, F]

    obs_dims = tuple(range(2, obs.dim()))
    obs_loss = 0.5 * (wm.decoder(feat) - obs).square().sum(obs_dims).mean()
    reward_in = feat if wm.cfg.reward_grad else feat.detach()
    reward_pred = wm.reward(reward_in).squeeze(-1)  # [B, T]
    reward_loss = 0.5 * (reward_pred - batch[REWARD]).square().mean()
    kl_loss, kl = kl_balance_loss(post.logits, prior.logits, wm.cfg.kl_balance, wm.cfg.kl_free)
    loss = kl_loss + obs_loss + reward_loss

    kl = kl.detach()
    with torch.no_grad():
        metrics = {
            "world_model/loss": loss.detach(),
            "world_model/kl_loss": kl_loss.detach(),
            "world_model/kl": kl.mean(),
            "world_model/obs_loss": obs_loss.detach(),
            "world_model/reward_loss": reward_loss.detach(),
            "world_model/prior_entropy": OneHotStraightThrough(prior.logits.detach()).entropy().mean(),
            "world_model/post_entropy": OneHotStraightThrough(post.logits.detach()).entropy().mean(),
        }
    return loss, metrics, WorldModelOutput(post, prior, feat, kl)


class Trajectory:
    """An imagined rollout of H steps from N start states (H + 1 states, the start included).

    `feat` is the primary record: `deter` and the `state`'s deter and stoch are views into it, and
    the state's logits are stacked only when `state` is first read.
    """

    def __init__(self, feat: Tensor, action: Tensor, logits: Sequence[Tensor], stoch: int, classes: int) -> None:
        self.feat = feat
        """[H + 1, N, feat] features, with gradients through the dynamics; feat[0] is the start's."""
        self.action = action
        """[H + 1, N, A] action[t] is the action taken AT state t (it led to state t + 1);
        action[H] is zeros (no action is taken at the last state)."""
        self._logits = list(logits)
        self._latent = stoch * classes
        self._shape = (stoch, classes)

    def detach(self) -> Trajectory:
        """The same rollout without its graph (views, no copies)."""
        stoch, classes = self._shape
        return Trajectory(self.feat.detach(), self.action.detach(), [x.detach() for x in self._logits], stoch, classes)

    @property
    def deter(self) -> Tensor:
        """[H + 1, N, deter] a view into `feat`."""
        return self.feat[..., self._latent:]

    @functools.cached_property
    def state(self) -> State:
        """[H + 1, N, ...] the prior states; state[0] is the (detached) start."""
        stoch = self.feat[..., :self._latent].unflatten(-1, self._shape)
        return State(self.deter, stoch, torch.stack(self._logits))


Policy = Callable[[State, int], Tensor]
"""policy(state [N] detached, t) -> action [N, A] taken at that state."""


def imagine(wm: WorldModel, start: State, policy: Policy, horizon: int,
            generator: torch.Generator | None = None) -> Trajectory:
    """Roll the prior forward `horizon` steps from `start` (any leading dims, flattened to [N] and
    detached) with actions from `policy`.

    What is detached: the start states, and the states handed to the policy (the policy's *input*,
    as in DreamerV2). Not detached: the actions the policy returns and the dynamics, so gradients
    flow from later features back through the RSSM into earlier actions (dynamics backpropagation).
    Freeze the world model's parameters (agents.nets.frozen) when only the policy should learn.
    """
    rssm = wm.rssm
    state = start.flatten().detach()
    feats, logits, actions = [rssm.feature(state)], [state.logits], []
    for t in range(horizon):
        action = policy(state.detach(), t)  # [N, A]
        state = rssm.img_step(state, action, generator)
        feats.append(rssm.feature(state))
        logits.append(state.logits)
        actions.append(action)
    actions.append(state.deter.new_zeros(state.deter.shape[0], wm.action_dim))
    return Trajectory(torch.stack(feats), torch.stack(actions), logits, rssm.stoch, rssm.classes)
