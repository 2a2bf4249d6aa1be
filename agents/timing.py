"""Wall-clock time per part of a learner update, for metrics and `choreo bench learner`."""

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
    to do that (benchmarks); leave it None in training, where a sync would cost throughput."""

    def __init__(self, sync_device: torch.device | None = None) -> None:
        self.sync = sync_device is not None and sync_device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.totals.clear()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": seconds for name, seconds in self.totals.items()}
