"""Wall-clock time (and, when counted, floating-point operations) per part of a learner update,
for metrics and `choreo bench learner`."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PartTimer:
    """Accumulates seconds per named part (metrics `time/<part>_s`: seconds, as every duration in
    TensorBoard). On CUDA, kernels run asynchronously, so a part's
    time is only meaningful when the device is synchronised at its boundaries: pass the device
    to do that (benchmarks); leave it None in training, where a sync would cost throughput.

    With `counting(counter)` (a `torch.utils.flop_counter.FlopCounterMode` entered around the
    update), each part also accumulates the operations the counter saw inside it, forward and
    backward (`flops()`); parts may nest, and a nested part's operations count in its parent too."""

    def __init__(self, sync_device: torch.device | None = None) -> None:
        self.sync = sync_device is not None and sync_device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.operations: dict[str, int] = defaultdict(int)
        self.counter = None

    def reset(self) -> None:
        self.totals.clear()
        self.operations.clear()

    @contextmanager
    def counting(self, counter) -> Iterator[None]:
        self.counter = counter
        try:
            yield
        finally:
            self.counter = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        counted = self.counter.get_total_flops() if self.counter is not None else 0
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start
            if self.counter is not None:
                self.operations[name] += self.counter.get_total_flops() - counted

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": seconds for name, seconds in self.totals.items()}

    def flops(self) -> dict[str, int]:
        """Operations per part of the last update counted under `counting` (empty otherwise)."""
        return dict(self.operations)
