"""Rewards of Choreographer's skill learning: the k-NN particle entropy reward, the code reward,
and the running-magnitude normaliser of the exploration reward.

r_skill = r_ent + r_code (paper eq. 7 and Appendix B; reference brief section 4):
- `knn_particle_reward`: the mean over each state's K nearest neighbours (the state itself
  included) of max(d - clip, 0), with Euclidean d, no log, detached. The particles are every
  imagined `deter` of the skill rollout pooled together (40,000 x 200 at the paper's sizes).
- `code_reward`: -||D(z) - s||_2 (the norm, not its square), differentiable w.r.t. the state.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from choreo.agents.collective import SOLO, Collective

_REFINE_ULPS = 8192.0
"""Selected squared distances below `_REFINE_ULPS * eps * (|x_i|^2 + |x_j|^2)` are recomputed as
|x_i - x_j|^2. The rounding error of the expansion |x_i|^2 + |x_j|^2 - 2 x_i.x_j is some ulps of
|x_i|^2 + |x_j|^2 (times ~sqrt(D)): near 0 that is most of the value (a point's distance to itself
or to a duplicate would come out as up to ~1e-2 instead of 0); above the threshold it is at most
~0.1% of the distance, and far less for typical neighbours."""

_BF16_EXTRA = 2
"""With `bf16=True`, `_BF16_EXTRA * k` candidates are selected with the bfloat16 distances and
re-ranked by exact distances, so a neighbour is missed only when bfloat16 rounding pushes it out
of a twice-as-large candidate set."""

_GROUP = 16
"""Selection goes through the minima of `_GROUP` interleaved column groups (see `_row_smallest`)."""

_REFINE_ROWS = 256
"""Rows per block when recomputing all candidates exactly (bf16 mode): bounds the gathered
[rows, candidates, D] temporary."""


@torch.no_grad()
def knn_particle_reward(x: Tensor, k: int, clip: float = 1e-4, chunk: int = 2048,
                        bf16: bool = False, rows: tuple[int, int] | None = None) -> Tensor:
    """Particle-based entropy reward: for each row of `x` [N, D], the mean over its `k` nearest
    neighbours (Euclidean, the point itself included) of max(d - clip, 0). Returns [N], detached.

    Exact, and never builds the N x N distance matrix: `chunk` rows at a time, squared distances
    come from one fused `addmm` into a [chunk, N] buffer allocated once, and the k smallest of
    each row are selected (`_row_smallest`: exact, about half the cost of `topk`), so the extra
    memory is chunk x N x 4 bytes (plus O(N x (D + k))). The row's own |q|^2 is constant along the
    row and is added only to the k selected values; the square root is taken over those k values
    only. Self-distances and near-duplicates (where the expansion cancels badly) are recomputed
    as |x_i - x_j|^2, so they come out exactly 0 as with a brute-force `cdist`.

    `bf16=True` (approximate) runs the matmul in bfloat16 and uses it only to select 2k
    candidates, whose distances are recomputed exactly in float32 before the k smallest are kept.
    The bfloat16 matmul yields the full |q|^2 + |x|^2 - 2 q.x (|x|^2 split into two bfloat16
    terms), so its output is rounded relative to the distance itself rather than to |x|^2.
    If N < k, all N points are the neighbours. Float64 input is computed in float64, anything else
    in float32.

    `rows=(lo, hi)` scores only the rows lo..hi-1 (their neighbours still come from all of `x`)
    and returns `[hi - lo]`: a learner rank scores its own states against the pool of all ranks'.
    """
    if x.dim() != 2:
        raise ValueError(f"knn_particle_reward expects [N, D], got {tuple(x.shape)}")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be positive, got k={k}, chunk={chunk}")
    n = x.shape[0]
    lo, hi = (0, n) if rows is None else rows
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"rows {rows} are not within the {n} particles")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(hi - lo, dtype=dtype, device=x.device)
    if hi == lo:
        return out
    k = min(k, n)
    chunk = min(chunk, n)

    # Distances are translation invariant; centring shrinks |x|^2 and so the cancellation error.
    x = x.detach().to(dtype)
    x = x - x.mean(0)  # [N, D]
    sq = x.square().sum(1)  # [N], computed once
    if bf16:
        lhs, rhs = _bf16_operands(x, sq)  # [N, D + 4] each
        rhs_t = rhs.T
        k_sel = min(n, int(_BF16_EXTRA * k))
    else:
        x_t = x.T  # [D, N] view; BLAS takes the transpose without a copy
        k_sel = k
    buf = torch.empty(chunk * n, dtype=torch.bfloat16 if bf16 else dtype, device=x.device)  # the only chunk x N tensor
    tol = _REFINE_ULPS * torch.finfo(dtype).eps

    for start in range(lo, hi, chunk):
        end = min(start + chunk, hi)
        d2 = buf[: (end - start) * n].view(end - start, n)  # [c, N]
        if bf16:
            torch.mm(lhs[start:end], rhs_t, out=d2)  # ~ |q_i - x_j|^2
            _, idx = _row_smallest(d2, k_sel)  # [c, k_sel]
            val = _exact_sq_dists(x, start, idx)  # [c, k_sel]
            val = val.topk(k, dim=1, largest=False, sorted=False).values  # [c, k]
        else:
            # d2[i, j] = |x_j|^2 - 2 q_i.x_j (the row constant |q_i|^2 does not change the ranking)
            torch.addmm(sq, x[start:end], x_t, alpha=-2.0, out=d2)
            val, idx = _row_smallest(d2, k)  # [c, k]
            sq_q = sq[start:end, None]  # [c, 1]
            val = val + sq_q  # full squared distances
            rows, cols = (val < tol * (sq_q + sq[idx])).nonzero(as_tuple=True)
            if rows.numel():
                diff = x[start + rows] - x[idx[rows, cols]]  # [m, D]
                val[rows, cols] = diff.square().sum(1)
        dist = val.clamp_min_(0.0).sqrt_()  # [c, k]
        out[start - lo:end - lo] = (dist - clip).clamp_min_(0.0).mean(1)
    return out


def _bf16_operands(x: Tensor, sq: Tensor) -> tuple[Tensor, Tensor]:
    """bfloat16 matrices whose product is |x_i|^2 + |x_j|^2 - 2 x_i.x_j, accumulated in float32:
    [x, hi, lo, 1, 1] and [-2 x, 1, 1, hi, lo], with |x|^2 = hi + lo to ~16 bits."""
    hi = sq.to(torch.bfloat16).to(x.dtype)
    lo = (sq - hi).to(torch.bfloat16).to(x.dtype)
    one = torch.ones_like(sq)
    lhs = torch.cat([x, torch.stack([hi, lo, one, one], 1)], 1)  # [N, D + 4]
    rhs = torch.cat([-2.0 * x, torch.stack([one, one, hi, lo], 1)], 1)  # [N, D + 4]
    return lhs.to(torch.bfloat16), rhs.to(torch.bfloat16)


def _row_smallest(d2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest values of each row of `d2` [c, N] and their columns, exactly (unsorted).

    Same result as `topk(largest=False)`, at about half its cost on long rows: the columns are
    split into m = N // G interleaved groups {u, u + m, u + 2m, ...} (plus the N % G tail
    columns, always kept). One strided `amin` gives each group's minimum; only the k groups with
    the smallest minima can hold the k smallest values (any group left out has k chosen groups
    whose minima, k distinct elements, are no larger than its own), so `topk` runs on those
    k * G columns instead of N.
    """
    c, n = d2.shape
    m = n // _GROUP
    if m < 4 * k:  # short rows: plain topk
        return d2.topk(k, dim=1, largest=False, sorted=False)
    body = m * _GROUP
    group_min = d2[:, :body].view(c, _GROUP, m).amin(dim=1)  # [c, m]
    groups = group_min.topk(k, dim=1, largest=False, sorted=False).indices  # [c, k]
    offsets = torch.arange(0, body, m, device=d2.device)  # [G]
    cols = (groups[:, :, None] + offsets).reshape(c, k * _GROUP)  # [c, k*G]
    if body < n:
        cols = torch.cat([cols, torch.arange(body, n, device=d2.device).expand(c, -1)], dim=1)
    val, pos = d2.gather(1, cols).topk(k, dim=1, largest=False, sorted=False)  # [c, k]
    return val, cols.gather(1, pos)


def _exact_sq_dists(x: Tensor, start: int, idx: Tensor) -> Tensor:
    """|x[start + i] - x[idx[i, j]]|^2 for idx [c, m] -> [c, m], in blocks of rows."""
    out = torch.empty(idx.shape, dtype=x.dtype, device=x.device)
    for r in range(0, idx.shape[0], _REFINE_ROWS):
        block = idx[r:r + _REFINE_ROWS]  # [b, m]
        q = x[start + r:start + r + block.shape[0], None, :]  # [b, 1, D]
        out[r:r + block.shape[0]] = (x[block] - q).square().sum(-1)  # [b, m]
    return out


def code_reward(decoded_code: Tensor, deter: Tensor) -> Tensor:
    """r_code = -||D(z) - s||_2 over the last dim: `[..., D], [..., D] -> [...]`.

    The L2 norm, not its square (paper Appendix B). Not detached: the skill actor gets its
    pathwise gradient through `deter` (and through `decoded_code` unless the caller freezes or
    detaches the skill decoder).
    """
    return -torch.linalg.vector_norm(decoded_code - deter, dim=-1)


class RunningMagnitude(nn.Module):
    """Divides a reward by a running estimate of its magnitude (DreamerV2's StreamNorm).

    On each call: mag <- m * mag + (1 - m) * mean|r|, then returns r / (mag + eps). `mag` starts
    at 1 and lives in a buffer, so it is checkpointed with the module. Momentum 1 is a no-op
    (r is returned unchanged), which is what the reference's skill reward uses. A batch whose
    mean|r| is NaN or infinite leaves `mag` as it was (decided on the device). With several
    learners (`collective`), mean|r| is averaged over the ranks' batches (equal sizes), so every
    rank keeps the same magnitude.
    """

    def __init__(self, momentum: float, eps: float = 1e-8, collective: Collective = SOLO) -> None:
        super().__init__()
        self.collective = collective
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mag", torch.ones(()))

    def forward(self, reward: Tensor, update: bool = True) -> Tensor:
        """`[...] -> [...]`; with `update=False` the magnitude is used but not changed."""
        if self.momentum >= 1.0:
            return reward
        if update:
            with torch.no_grad():
                batch_mag = reward.detach().abs().mean().to(self.mag.dtype).reshape(1)
                self.collective.mean_([batch_mag])  # several learners: the mean over every rank's batch
                batch_mag = batch_mag[0]
                mag = self.mag.mul(self.momentum).add_((1.0 - self.momentum) * batch_mag)
                self.mag.copy_(torch.where(torch.isfinite(mag), mag, self.mag))
        # `mag + eps` is a new tensor, so a later in-place update cannot invalidate this graph.
        return reward / (self.mag + self.eps).to(reward.dtype)
