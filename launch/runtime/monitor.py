"""What a person watching a run sees: TensorBoard event files under the run directory (scalars,
histograms, images and GIF videos) and a progress line (frames, frames/s, updates/s, time left and
which side sets the pace) on the terminal."""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from choreo.launch.runtime.rundir import RunDir

PACE_WINDOW = 600.0
"""Seconds of recent progress the rates of the time estimate are measured over."""
RATE_WINDOW = 30.0
"""Seconds the throughput scalars (frames/s, updates/s in TensorBoard) are measured over at least:
the loops log every few seconds and at every episode end, often between two learner calls, so a
rate since the previous log alone would mostly read 0 and sometimes many times the true rate."""


class Pace:
    """Rates over the last `window` seconds after the warm-up, which side holds the other back,
    and the time left at that pace.

    With a ratio target the limiter ties frames to updates: when the learner is the slower side
    (the workers are held back, waiting for it), the run advances at `updates/s x frames_per_update`
    frames per second, where `frames_per_update` is what the target allows (batch steps / samples
    per insert x action repeat); otherwise at the workers' frame rate. The warm-up's burst of random
    frames is left out: it says nothing of the pace after it.
    """

    def __init__(self, total_frames: int, frames_per_update: float, num_workers: int, window: float = PACE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total_frames, self.frames_per_update = total_frames, frames_per_update
        self.num_workers, self.window, self.clock = max(num_workers, 1), window, clock
        self._samples: deque[tuple[float, int, int, float, float]] = deque()

    def update(self, frames: int, updates: int, workers_held_s: float, learner_held_s: float) -> None:
        """Records the run's counters now: frames, updates, and the seconds the workers (summed over
        them) and the learner have been held back by the limiter so far."""
        now = self.clock()
        if len(self._samples) > 1 and now - self._samples[-2][0] < 1.0:
            self._samples.pop()  # at most one record a second: the newest replaces the last
        self._samples.append((now, frames, updates, workers_held_s, learner_held_s))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def _deltas(self) -> tuple[float, float, float, float, float] | None:
        if len(self._samples) < 2:
            return None
        (t0, f0, u0, w0, l0), (t1, f1, u1, w1, l1) = self._samples[0], self._samples[-1]
        return (t1 - t0, f1 - f0, u1 - u0, w1 - w0, l1 - l0) if t1 > t0 else None

    def rates(self) -> tuple[float, float]:
        """Frames/s and updates/s over the window (0 before two records)."""
        d = self._deltas()
        return (d[1] / d[0], d[2] / d[0]) if d else (0.0, 0.0)

    def bound(self) -> str | None:
        """"learner" when the workers spent more of the window held back than the learner did,
        "workers" when the learner did, None without a ratio target or before any wait."""
        d = self._deltas()
        if not d or not self.frames_per_update:
            return None
        workers_share, learner_share = d[3] / (d[0] * self.num_workers), d[4] / d[0]
        if max(workers_share, learner_share) < 0.05:
            return None
        return "learner" if workers_share > learner_share else "workers"

    def seconds_left(self, frames: int) -> float:
        fps, ups = self.rates()
        rate = ups * self.frames_per_update if self.bound() == "learner" else fps
        return max(self.total_frames - frames, 0) / rate if rate > 0 else math.inf


class Monitor:
    def __init__(self, run_dir: Path, total_frames: int, stream: TextIO | None = None, unit: str = "frames",
                 interval: float = 1.0, rate_window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """rate_window: seconds `rates` measures over at least (once the run has lasted that long);
        clock: the time in seconds (tests pass their own)."""
        from torch.utils.tensorboard import SummaryWriter  # imported here: it costs a second

        self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard))
        self.total_frames = total_frames
        self.unit = unit  # what the progress count is: frames, or updates (an offline-only run)
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.interval = interval if self.interactive else max(interval, 10.0)
        self.clock = clock
        self._start = clock()
        self._last_print = 0.0
        self.rate_window = rate_window
        # (time, frames, updates) of the calls of `rates` within the window, and the newest before it
        self._counts: deque[tuple[float, int, int]] = deque([(self._start, 0, 0)])
        self.frames_per_second = 0.0
        self.updates_per_second = 0.0

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def histogram(self, tag: str, values, step: int, bins: str | Sequence[float] | None = None) -> None:
        """A histogram of `values` (any array-like of numbers). bins: as torch's `add_histogram`
        takes them; None: one bin per integer for integer values (e.g. code indices, so that each
        code has its bar), TensorBoard's default buckets otherwise."""
        values = np.asarray(values).ravel()
        if bins is None:
            if values.dtype.kind in "iub" and values.size and int(values.max()) - int(values.min()) <= 4096:
                bins = np.arange(int(values.min()), int(values.max()) + 2) - 0.5
            else:
                bins = "tensorflow"
        self.writer.add_histogram(tag, values, step, bins=bins)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An image `[H, W, 3]` uint8 (a PNG in the event file)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image '{tag}': expected [H, W, 3] uint8, got {image.shape} {image.dtype}")
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def video(self, tag: str, frames: np.ndarray, step: int, fps: float = 20.0) -> None:
        """Frames `[T, H, W, 3]` uint8 as an animated GIF inside an image summary, which
        TensorBoard's image dashboard plays (torch's `add_video` needs moviepy; this needs Pillow)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        from choreo.launch.runtime.media import encode_gif

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"video '{tag}': expected [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
        picture = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                                encoded_image_string=encode_gif(frames, fps))
        summary = Summary(value=[Summary.Value(tag=tag, image=picture)])
        self.writer._get_file_writer().add_summary(summary, step)  # what torch's add_* do underneath

    def media(self, items: Mapping[str, np.ndarray], step: int, fps: float = 20.0) -> None:
        """Writes each of `items` by its form: `[H, W, 3]` uint8 as an image, `[T, H, W, 3]`
        uint8 as a video, anything else as a histogram of its values (e.g. the dict that
        `launch.commands.visualize.learner_media` returns)."""
        for tag, value in items.items():
            value = np.asarray(value)
            if value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] == 3:
                self.image(tag, value, step)
            elif value.dtype == np.uint8 and value.ndim == 4 and value.shape[-1] == 3:
                self.video(tag, value, step, fps)
            elif value.size:
                self.histogram(tag, value, step)

    def start_rates(self, frames: int, updates: int) -> None:
        """Where `rates` counts from: the counters now (a resumed run's, not zero)."""
        self._counts = deque([(self.clock(), int(frames), int(updates))])

    def rates(self, frames: int, updates: int) -> tuple[float, float]:
        """Frames/s and updates/s over the last `rate_window` seconds at least: since the newest
        earlier call that is at least that old (since `start_rates` or the monitor's start while
        the run is younger). Calls however frequent, with updates in some intervals and none in
        others, read the same steady rate."""
        now = self.clock()
        counts = self._counts
        if len(counts) > 1 and counts[-1][0] - counts[-2][0] < 1.0:
            counts.pop()  # records a second apart at most: one less than a second after the one before is replaced
        counts.append((now, int(frames), int(updates)))
        while len(counts) > 2 and now - counts[1][0] >= self.rate_window:
            counts.popleft()
        t0, f0, u0 = counts[0]
        dt = now - t0
        if dt > 0:
            self.frames_per_second, self.updates_per_second = (frames - f0) / dt, (updates - u0) / dt
        return self.frames_per_second, self.updates_per_second

    def progress(self, frames: int, updates: int, extra: str = "", force: bool = False,
                 pace: Pace | None = None, eta: bool = True) -> None:
        """Prints the progress line (at most every `interval` seconds unless `force`). With `pace`,
        the rates and the time left are its (recent, after the warm-up, at the pace the limiter
        allows) and the line names the side that sets the pace; without, they are since the start.
        eta=False: no time left (a warm-up says nothing of the pace after it)."""
        now = self.clock()
        if not force and now - self._last_print < self.interval:
            return
        self._last_print = now
        if pace is not None:
            (fps, ups), left, bound = pace.rates(), pace.seconds_left(frames), pace.bound()
        else:
            elapsed = now - self._start
            fps = frames / elapsed if elapsed > 0 else 0.0
            ups = updates / elapsed if elapsed > 0 else 0.0
            left, bound = (self.total_frames - frames) / fps if fps > 0 and eta else float("inf"), None
        share = min(frames / self.total_frames, 1.0) if self.total_frames else 1.0
        bar = "#" * int(share * 20)
        pace_note = f" ({bound}-bound)" if bound else ""
        rate = f"{fps:,.0f} fps  " if self.unit == "frames" else ""
        line = (f"[{bar:<20}] {frames:,}/{self.total_frames:,} {self.unit}  {rate}{ups:.3g} upd/s  "
                f"left {_duration(left)}{pace_note}  {extra}")
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
    """The world model's loss (DADS: skill dynamics') for the progress line ("" before the first update)."""
    loss = metrics.get("world_model/loss", metrics.get("dynamics/loss"))
    return "" if loss is None else f"loss {loss:.2f}"
