"""What a person watching a run sees: TensorBoard event files under the run directory and a
progress line (frames, frames/s, updates/s, time left) on the terminal."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO


class Monitor:
    def __init__(self, run_dir: Path, total_frames: int, stream: TextIO | None = None,
                 interval: float = 1.0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: it costs a second

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.total_frames = total_frames
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.interval = interval if self.interactive else max(interval, 10.0)
        self._start = time.monotonic()
        self._last_print = 0.0
        self._last = (self._start, 0, 0)  # time, frames, updates at the previous rate estimate
        self.frames_per_second = 0.0
        self.updates_per_second = 0.0

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def histogram(self, key: str, values, step: int) -> None:
        self.writer.add_histogram(key, values, step)

    def rates(self, frames: int, updates: int) -> tuple[float, float]:
        """Frames/s and updates/s since the previous call."""
        now = time.monotonic()
        t0, f0, u0 = self._last
        dt = max(now - t0, 1e-9)
        self.frames_per_second, self.updates_per_second = (frames - f0) / dt, (updates - u0) / dt
        self._last = (now, frames, updates)
        return self.frames_per_second, self.updates_per_second

    def progress(self, frames: int, updates: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.interval:
            return
        self._last_print = now
        elapsed = now - self._start
        fps = frames / elapsed if elapsed > 0 else 0.0
        ups = updates / elapsed if elapsed > 0 else 0.0
        left = (self.total_frames - frames) / fps if fps > 0 else float("inf")
        share = min(frames / self.total_frames, 1.0) if self.total_frames else 1.0
        bar = "#" * int(share * 20)
        line = (f"[{bar:<20}] {frames:,}/{self.total_frames:,} frames  {fps:,.0f} fps  {ups:.2f} upd/s  "
                f"left {_duration(left)}  {extra}")
        if self.interactive:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
        self.writer.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds > 999 * 86400:
        return "?"  # no rate yet, or a run meant to be stopped by hand
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def loss_note(metrics: Mapping[str, float]) -> str:
    """The world model's loss for the progress line ("" before the first update)."""
    loss = metrics.get("world_model/loss")
    return "" if loss is None else f"loss {loss:.2f}"
