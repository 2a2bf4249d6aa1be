"""Choreographer's skill auto-encoder: a VQ-VAE over the world model's deterministic state, with
an EMA codebook and code resampling (paper section 3.2 and Appendix C; reference brief section 3).

Per learner step the caller does, on the posterior `deter` of the batch:

    loss, metrics, aux = skill_loss(sae, deter)          # pure
    optimizer.step(loss)                                 # encoder + decoder only
    metrics |= sae.codebook_step(aux["z_e"], aux["indices"], generator)   # EMA + resampling

The codebook is not trained by gradient: `ema_update` moves each code to the running mean of
the embeddings assigned to it, and `maybe_resample` re-places the codes that no embedding chose
since the last check. Every random choice takes an explicit `torch.Generator`.

Two deliberate departures from the reference, both about keeping embed_avg / cluster_size equal
to the code (the EMA's invariant):
- `cluster_size` starts at 1 (one unit of mass at each initial code), not 0. With 0, the first
  EMA step divides the decayed initial code by the Laplace-smoothed size ~1e-5 and throws every
  code that batch did not choose ~1e5 times further out, where it can never be chosen again.
- A resampled code gets `cluster_size` 1 (the one point that now defines it), see `maybe_resample`.

As in the reference, a resampled code is drawn with probability proportional to the Euclidean
distance to the nearest code (the paper's formula reads as a power of it, k-means++ style).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from choreo.agents.collective import SOLO, Collective
from choreo.agents.config import ChoreographerConfig
from choreo.agents.nets import MLP


class SkillAutoEncoder(nn.Module):
    """Encoder MLP(deter -> code_dim), codebook of `num_codes` codes, decoder MLP(code_dim -> deter).

    Both MLPs have `layers` hidden blocks of Linear(units) + LayerNorm + ELU (4 x 400 in the
    paper). Their initial weights (PyTorch's default scheme) and the codebook (U[0, 1), as in the
    reference) are drawn from `generator` (a CPU generator; move the module afterwards).

    Buffers (checkpointed with the module, no gradient):
    - `codebook` [K, C]: the codes.
    - `embed_avg` [K, C]: EMA of the sum of the embeddings assigned to each code.
    - `cluster_size` [K]: EMA of the number of embeddings assigned to each code.
    - `usage` [K]: embeddings assigned to each code since the last resampling check.
    - `updates` []: calls of `maybe_resample` so far.
    """

    def __init__(self, deter_dim: int, cfg: ChoreographerConfig, units: int = 400, layers: int = 4, *,
                 generator: torch.Generator, collective: Collective = SOLO) -> None:
        super().__init__()
        self.cfg = cfg
        self.collective = collective
        self.num_codes = cfg.num_codes
        self.code_dim = cfg.code_dim
        self.encoder = MLP(deter_dim, cfg.code_dim, units, layers, norm=True)
        self.decoder = MLP(cfg.code_dim, deter_dim, units, layers, norm=True)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _reset_linear(module, generator)
        codebook = torch.rand(cfg.num_codes, cfg.code_dim, generator=generator)  # [K, C]
        self.register_buffer("codebook", codebook)
        self.register_buffer("embed_avg", codebook.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.num_codes))
        self.register_buffer("usage", torch.zeros(cfg.num_codes, dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    # ---- codebook lookups ----

    def nearest(self, z_e: Tensor) -> Tensor:
        """Index of the nearest code (L2) of each embedding: `[N, C] -> [N]` (ties: lowest index)."""
        codebook = self.codebook.float()
        # |z|^2 is constant along a row, so argmin_k |e_k|^2 - 2 z.e_k is the nearest code.
        with torch.autocast(z_e.device.type, enabled=False):
            scores = torch.addmm(codebook.square().sum(1), z_e.detach().float(), codebook.T, alpha=-2.0)  # [N, K]
        return scores.argmin(dim=1)

    def quantize(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """`z_e [N, C] -> (z_q [N, C], indices [N])`: z_q has the code's value and z_e's gradient
        (straight-through estimator)."""
        indices = self.nearest(z_e)
        code = self.codebook[indices].to(z_e.dtype)  # [N, C]
        return z_e + (code - z_e).detach(), indices

    def code_vectors(self, skill: Tensor) -> Tensor:
        """Code vectors of skills given as one-hot (or soft) `[..., K]` or indices `[...]` -> `[..., C]`.

        For one-hot input this is `skill @ codebook`, differentiable w.r.t. `skill`.
        """
        if not skill.is_floating_point():
            return self.codebook[skill]
        return skill @ self.codebook.to(skill.dtype)

    def decode_code(self, skill: Tensor) -> Tensor:
        """The decoded state of each skill's code: indices `[...]` or one-hot `[..., K]` -> `[..., deter]`."""
        return self.decoder(self.code_vectors(skill))

    # ---- non-gradient codebook updates ----

    @torch.no_grad()
    def ema_update(self, z_e: Tensor, indices: Tensor, skip: Tensor | None = None) -> None:
        """EMA step of the codebook on a batch of embeddings and their assigned codes.

        cluster_size <- d * cluster_size + (1 - d) * counts
        embed_avg    <- d * embed_avg + (1 - d) * (sum of z_e assigned to each code)
        codebook     <- embed_avg / laplace(cluster_size),
        laplace(c)    = (c + eps) / (n + K * eps) * n with n = sum(c), eps = 1e-5.
        Also adds the counts to `usage`. `z_e` [N, C], `indices` [N].

        Non-finite guard: if any of `z_e` is NaN or infinite, or `skip` (a 0-d tensor, nonzero
        when the caller's update was skipped) is set, nothing changes. Decided on the device
        (masked writes), without a host sync.

        Several learners: the counts, the sums and the non-finite flag are summed over the ranks
        first (one transfer), so that every rank moves the codes alike and `usage` is global.
        """
        decay, eps = self.cfg.ema_decay, 1e-5
        z_e = z_e.detach().reshape(-1, self.code_dim).to(self.embed_avg.dtype)
        indices = indices.reshape(-1)
        counts = torch.bincount(indices, minlength=self.num_codes).to(self.cluster_size.dtype)  # [K]
        sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, z_e)  # [K, C]
        bad = (~torch.isfinite(z_e).all()).to(sums.dtype).reshape(1)
        self.collective.sum_([counts, sums, bad])
        keep = bad[0] > 0  # 0-d bool: True leaves every buffer as it is
        if skip is not None:
            keep = keep | (skip.to(keep.device) != 0)
        cluster_size = self.cluster_size.mul(decay).add_(counts, alpha=1.0 - decay)
        embed_avg = self.embed_avg.mul(decay).add_(sums, alpha=1.0 - decay)
        n = cluster_size.sum()
        smoothed = (cluster_size + eps) / (n + self.num_codes * eps) * n  # [K]
        codebook = embed_avg / smoothed[:, None]
        self.cluster_size.copy_(torch.where(keep, self.cluster_size, cluster_size))
        self.embed_avg.copy_(torch.where(keep, self.embed_avg, embed_avg))
        self.codebook.copy_(torch.where(keep, self.codebook, codebook))
        self.usage.add_(torch.where(keep, 0, counts.to(self.usage.dtype)))

    @torch.no_grad()
    def maybe_resample(self, z_e: Tensor, generator: torch.Generator, skip: Tensor | None = None) -> int:
        """Counts one update; every `resample_every` updates (0: never) re-places each code that no
        embedding chose since the last check (unless `resample_codes` is off: then the check only
        starts a new window), and returns how many were re-placed (else 0).

        Codes with `usage == 0` are taken in index order. Each becomes a point of `z_e` [N, C]
        drawn with probability proportional to that point's Euclidean distance to its nearest
        current code, the distances being recomputed after each replacement (so a point just
        used has distance 0 and cannot be drawn again). Both `codebook` and `embed_avg` rows are
        overwritten with the point; then `usage` is zeroed. Call it after `ema_update` of the same
        batch, so that `usage` covers the whole window.

        cluster_size: the reference leaves it as it was (about 0 for a code that was never
        used). We set it to 1, the weight of the single point that now defines the code, so that
        embed_avg / cluster_size is again the code. Left at ~0, the next EMA step computes
        (0.99 p + 0.01 S) / (0.01 m + ~0) ~ p / (0.01 m) for m assigned points: the fresh code
        jumps away from the data (or ~1e5 times out if m = 0) and is dead again, yet it counts
        as used in the window that follows (in the miniature Figure 7 of the tests, the
        reference's choice reports ~64 active codes at a check while 2 to 5 stay in use). Equal
        to 1, it moves to the mean of the points it wins like any small cluster.

        Non-finite guard: an update whose `z_e` is not finite, or with `skip` set (as in
        `ema_update`), is not counted and re-places nothing; the window then simply lasts one
        update longer. The counter and the flag are read back together, in one transfer.

        Several learners: pass `skip` decided for all ranks (`codebook_step` does). The points are
        every rank's `z_e`, gathered; rank 0 draws the codes with its generator and sends them to
        the others, so every rank has the same codebook after a check.
        """
        keep = _keep_old(z_e, skip)
        self.updates.add_((~keep).to(self.updates.dtype))
        every = self.cfg.resample_every
        if every <= 0:
            return 0
        count, kept = torch.stack([self.updates, keep.to(self.updates.dtype)]).tolist()
        if kept or count % every != 0:
            return 0
        dead = (self.usage == 0).nonzero().flatten().tolist() if self.cfg.resample_codes else []
        if dead:  # the same on every rank: `usage` is global
            z_e = self.collective.gather(z_e.detach().reshape(-1, self.code_dim).to(self.codebook.dtype))
            if self.collective.rank == 0:
                self._replace(dead, z_e, generator)
            self.collective.broadcast_([self.codebook, self.embed_avg, self.cluster_size])
        self.usage.zero_()
        return len(dead)

    def _replace(self, dead: list[int], z_e: Tensor, generator: torch.Generator) -> None:
        """Re-places each code of `dead` by a point of `z_e` (see `maybe_resample`)."""
        for code in dead:
            dist = torch.cdist(z_e, self.codebook, compute_mode="donot_use_mm_for_euclid_dist")  # [N, K]
            nearest = dist.min(dim=1).values  # [N]
            if float(nearest.sum()) > 0.0:
                weights = nearest
            else:  # every point sits on a code: any choice is as good as another
                weights = torch.ones_like(nearest)
            pick = int(torch.multinomial(weights.to(generator.device), 1, generator=generator))
            self.codebook[code] = z_e[pick]
            self.embed_avg[code] = z_e[pick]  # = point * cluster_size, with cluster_size 1
            self.cluster_size[code] = 1.0

    def codebook_step(self, z_e: Tensor, indices: Tensor, generator: torch.Generator,
                      skip: Tensor | None = None) -> dict[str, Tensor]:
        """`ema_update` then `maybe_resample`; with a non-finite `z_e` or `skip` set (pass the
        skill optimizer's `codebook/nonfinite`), neither changes anything. Returns their metrics as
        detached 0-d tensors:

        - `codebook/window_active_codes`: codes chosen at least once since the last resampling check,
          this batch included (at a check step, the number of codes the paper calls active).
        - `codebook/resampled_codes`: codes re-placed by this call (0 except at check steps).
        """
        keep = _keep_old(z_e, skip)
        if self.collective.active:  # a NaN on any rank keeps every rank's codebook as it is
            keep = self.collective.any(keep)
        self.ema_update(z_e, indices, skip=keep)
        window_active = (self.usage > 0).sum()
        resampled = self.maybe_resample(z_e, generator, skip=keep)
        return {
            "codebook/window_active_codes": window_active.float(),
            "codebook/resampled_codes": torch.tensor(float(resampled)),
        }


def _keep_old(z_e: Tensor, skip: Tensor | None) -> Tensor:
    """0-d bool on `z_e`'s device: True when the codebook must not absorb this batch (a NaN or
    infinite embedding, or the caller's `skip` flag set)."""
    keep = ~torch.isfinite(z_e).all()
    if skip is not None:
        keep = keep | (skip.to(keep.device) != 0)
    return keep


def skill_loss(sae: SkillAutoEncoder, deter: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """VQ-VAE loss of the skill auto-encoder on model states `deter` [..., deter_dim].

    loss = MSE(decoder(z_q), deter) + commitment * MSE(z_e, sg(code)), with z_q the straight-
    through quantisation of z_e = encoder(deter). `deter` is detached: the skill loss does not
    train the world model. Pure: the codebook is read, not changed (see `codebook_step`).

    Returns (loss, metrics, aux):
    - metrics (detached 0-d tensors): `codebook/loss`, `codebook/recon`, `codebook/commitment` (the
      unweighted MSE), `codebook/perplexity` (exp of the entropy of this batch's code
      assignments), `codebook/active_codes` (distinct codes chosen in this batch).
    - aux: `z_e` [N, C] (detached) and `indices` [N], for `codebook_step`.
    """
    deter = deter.detach().reshape(-1, deter.shape[-1])  # [N, deter]
    z_e = sae.encoder(deter)  # [N, C]
    z_q, indices = sae.quantize(z_e)
    code = sae.codebook[indices].to(z_e.dtype)  # [N, C], a buffer: no gradient
    recon = F.mse_loss(sae.decoder(z_q), deter)
    commitment = F.mse_loss(z_e, code)
    loss = recon + sae.cfg.commitment * commitment
    with torch.no_grad():
        counts = torch.bincount(indices, minlength=sae.num_codes).float()  # [K]
        probs = counts / counts.sum()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        metrics = {
            "codebook/loss": loss.detach(),
            "codebook/recon": recon.detach(),
            "codebook/commitment": commitment.detach(),
            "codebook/perplexity": entropy.exp(),
            "codebook/active_codes": (counts > 0).sum().float(),
        }
    return loss, metrics, {"z_e": z_e.detach(), "indices": indices}


def _reset_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default Linear initialisation, drawn from `generator`."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(layer.weight.shape[1]) if layer.weight.shape[1] > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
