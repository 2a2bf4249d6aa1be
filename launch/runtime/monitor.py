"""What a person watching a run sees: TensorBoard event files under the run directory (scalars,
histograms, images and GIF videos, the run's config as text and its hyperparameters in the HParams
view) and a progress line (frames, frames/s, updates/s, time left, which side sets the pace and the
world model's loss) on the terminal.

On a terminal the line is redrawn in place and fits its width, read again at every redraw (a
resized window gets lines of its new width): the fields that do not fit are left out, the least
important first, so that a line never wraps. Anywhere else (a log file, a pipe, a cluster job's
output) it is a plain line every PLAIN_INTERVAL seconds and one at the end."""

from __future__ import annotations

import math
import shutil
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
PLAIN_INTERVAL = 30.0
"""Seconds between two progress lines when the stream is not a terminal: a redraw there would pile
up as one line per redraw."""
BAR_WIDTH = 20
CLEAR_TO_END = "\x1b[K"
"""Erases the rest of the terminal's line after a redraw, in place of padding: padding to a fixed
width wraps on a narrower terminal, and every wrapped redraw scrolls."""
HParam = str | int | float | bool
"""A value in TensorBoard's HParams view."""
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
                 interval: float = 1.0, plain_interval: float = PLAIN_INTERVAL, rate_window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """interval: seconds between two redraws on a terminal; plain_interval: between two lines
        elsewhere; rate_window: seconds `rates` measures over at least (once the run has lasted that
        long); clock: the time in seconds (tests pass their own)."""
        from torch.utils.tensorboard import SummaryWriter  # imported here: it costs a second

        self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard))
        self.total_frames = total_frames
        self.unit = unit  # what the progress count is: frames, or updates (an offline-only run)
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self.interval = interval if self.interactive else plain_interval
        self.clock = clock
        self._start = clock()
        self._last_print = -math.inf
        self._drawn = False  # a redrawn line is on the terminal, without its newline yet
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

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown text (TensorBoard's text dashboard)."""
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def hparams(self, values: Mapping[str, HParam | None], columns: Mapping[str, type],
                metrics: Sequence[str]) -> None:
        """This run's row of TensorBoard's HParams view: `values` (None: does not apply to this
        run) under `columns` (name -> str, int, float or bool), beside the latest value of each
        scalar tag of `metrics`, read from this run's own series (a run that crashed shows where
        it got to).

        Written into the run's own event files, not into a sub-run as SummaryWriter.add_hparams
        does (one more row per call there), so each run directory is one row. TensorBoard takes
        its columns from the first run it finds that names them, and otherwise makes a metric
        column of every scalar tag: every run therefore names the same `columns` and `metrics`."""
        from torch.utils.tensorboard.summary import hparams

        blank = {str: "", bool: False, int: 0, float: 0.0}
        experiment, _, _ = hparams({name: blank[kind] for name, kind in columns.items()}, dict.fromkeys(metrics, 0.0))
        _, session, _ = hparams({k: v for k, v in values.items() if v is not None and k in columns}, {})
        writer = self.writer._get_file_writer()  # what torch's add_* do underneath
        writer.add_summary(experiment)
        writer.add_summary(session)
        self.writer.flush()

    def progress(self, frames: int, updates: int, extra: str | Sequence[str] = (), force: bool = False,
                 pace: Pace | None = None, eta: bool = True) -> None:
        """Shows the progress (at most every `interval` seconds unless `force`): on a terminal a
        redraw of one line that fits its width, elsewhere a plain line. With `pace`, the rates and
        the time left are its (recent, after the warm-up, at the pace the limiter allows) and the
        line names the side that sets the pace; without, they are since the start. eta=False: no
        time left (a warm-up says nothing of the pace after it). extra: labelled fields (e.g.
        `loss_note`'s), after the time left in importance.

        The count never reads more than the total: the last calls of a run may bring it a little
        past (a worker's call brings all its steps)."""
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
            left, bound = max(self.total_frames - frames, 0) / fps if fps > 0 and eta else math.inf, None
        total = self.total_frames
        shown = min(frames, total) if total else frames
        share = shown / total if total else 1.0
        # (rank, text) in the order shown; rank 0 is kept longest when the line must be shorter
        fields: list[tuple[int, str]] = []
        if self.interactive:
            fields.append((6, f"[{'#' * int(share * BAR_WIDTH):<{BAR_WIDTH}}]"))
        fields.append((0, f"{shown:,}/{total:,} {self.unit} ({int(share * 100)}%)"))
        if self.unit == "frames":
            fields.append((3, f"{fps:,.0f} fps"))
        fields.append((4, f"{ups:.3g} upd/s"))
        if math.isfinite(left) and _duration(left) != "?":
            fields.append((1, f"left {_duration(left)}"))
        if bound:
            fields.append((5, f"({bound}-bound)"))
        fields.extend((2, e.strip()) for e in ([extra] if isinstance(extra, str) else extra) if e and e.strip())
        if self.interactive:
            width = max(shutil.get_terminal_size().columns - 1, 1)  # a full line wraps on some terminals
            self.stream.write("\r" + fit(fields, width) + CLEAR_TO_END)
            self._drawn = True
        else:
            self.stream.write(fit(fields) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")  # the redrawn line stays, what follows starts below it
            self.stream.flush()
            self._drawn = False
        self.writer.close()


def fit(fields: Sequence[tuple[int, str]], width: int | None = None, sep: str = "  ") -> str:
    """The fields `(rank, text)` joined in their order, within `width` columns (None: all): the
    lower ranks first, up to the first that does not fit; the rank-0 field alone is cut to the
    width when even it does not fit."""
    if width is None:
        return sep.join(text for _, text in fields)
    order = sorted(range(len(fields)), key=lambda i: fields[i][0])
    kept: list[int] = []
    for i in order:
        trial = sorted([*kept, i])
        if len(sep.join(fields[j][1] for j in trial)) > width:
            break
        kept = trial
    if not kept:
        return fields[order[0]][1][:width] if fields else ""
    return sep.join(fields[j][1] for j in kept)


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
    """The world model's loss (DADS: its skill dynamics') for the progress line, labelled ("" before
    the first update)."""
    if "world_model/loss" in metrics:
        return f"wm loss {metrics['world_model/loss']:.2f}"
    if "dynamics/loss" in metrics:
        return f"dynamics loss {metrics['dynamics/loss']:.2f}"
    return ""
