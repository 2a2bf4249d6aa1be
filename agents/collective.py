"""What an agent's update needs from its learner group: W ranks, each with its own batch, that
train one agent and must stay bit-identical in everything but their random generators.

`SOLO` (one learner) does nothing and costs nothing: every call returns at once, so that the
update of a single learner is today's, bit for bit. `TorchCollective` runs the same calls over a
`torch.distributed` process group (NCCL on GPUs, gloo on CPUs); `choreo.learner.dist` forms it.

The rule that keeps the ranks together: every decision that depends on a batch (skip a
non-finite step, open the reward gate, re-place dead codes) is taken *after* a reduction, from
values that are then equal on every rank. A NaN on one rank spreads through a sum to all of
them, so a reduced sum's finiteness is a global decision with no extra call. Every rank makes
the same calls in the same order; a rank that skipped one would hang the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class Collective:
    """One rank alone (`rank` 0 of `world` 1): the reductions are identities."""

    rank = 0
    world = 1

    @property
    def active(self) -> bool:
        """Whether there are other ranks to talk to."""
        return self.world > 1

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sums each tensor over the ranks, in place (one flat transfer for all of them)."""

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        """Averages each tensor over the ranks, in place."""

    def any(self, flag: Tensor) -> Tensor:
        """A 0-d bool: whether `flag` is set on any rank."""
        return flag.bool()

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """For each host-side flag, whether it holds on every rank (one small transfer for all)."""
        return tuple(bool(f) for f in flags)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's `tensor` (equal shapes), concatenated along dim 0 in rank order."""
        return tensor

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrites each tensor with rank `src`'s, in place."""


SOLO = Collective()


class TorchCollective(Collective):
    """The calls of `Collective` over the default `torch.distributed` process group (already
    initialised by the caller). Tensors of several dtypes are reduced one flat bucket per dtype."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchCollective needs torch.distributed.init_process_group first")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        for group in _by_dtype(tensors):
            flat = torch.cat([t.reshape(-1) for t in group])
            self._dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        self.sum_(tensors)
        for t in tensors:
            t.div_(self.world)

    def any(self, flag: Tensor) -> Tensor:
        value = flag.detach().to(torch.float32).reshape(1).clone()
        self._dist.all_reduce(value, op=self._dist.ReduceOp.MAX)
        return value[0] > 0

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        value = torch.tensor([1.0 if f else 0.0 for f in flags], device=self._device())
        self._dist.all_reduce(value, op=self._dist.ReduceOp.MIN)
        return tuple(bool(v > 0) for v in value.tolist())

    def gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self._dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 0)

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        for group in _by_dtype(tensors):
            flat = torch.cat([t.reshape(-1) for t in group])
            self._dist.broadcast(flat, src)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self._dist.get_backend() == "nccl" \
            else torch.device("cpu")


def _by_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """The tensors grouped by (dtype, device), in first-seen order, so that each group is one bucket."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())
