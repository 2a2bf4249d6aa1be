"""The job runner: independent jobs (evaluation episodes, plans, videos, benchmarks) behind one
call, in this process (`--local`, one after another) or as Ray tasks (an embedded Ray, or the
cluster at `--address`), with one progress display; results come back in call order.

A job is `fn(*call)`: a plain function of picklable arguments that builds what it needs (its
environments, its policy) and returns a picklable result. The progress display is one line,
redrawn in place on a terminal and fitting 80 columns, or a plain line at intervals when the output
is not a terminal (a log file): jobs done, episodes (or the unit the caller counts) done, elapsed
time, and the time left, estimated from the units done so far.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from choreo.launch.runtime.monitor import _duration

WIDTH = 80
"""Columns the progress line fits in (it is one shorter: a full line wraps on some terminals)."""
REDRAW_SECONDS = 1.0
"""Seconds between two redraws of the line on a terminal."""
LOG_SECONDS = 10.0
"""Seconds between two plain lines when the output is not a terminal."""


class Progress:
    """The progress of `jobs` jobs worth `units` units of work (`unit`, e.g. episodes; default one
    per job) on `stream`: `update(jobs_done, units_done)` after each job, `close()` at the end.
    label: what runs (e.g. "choreo evaluate"), shown first when it fits. clock: seconds, monotonic."""

    def __init__(self, jobs: int, units: int | None = None, unit: str = "episodes", label: str = "",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs = int(jobs)
        self.units = int(units) if units is not None else None
        self.unit = unit
        self.label = label
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self.clock = clock
        self.start = clock()
        self._shown = -math.inf  # when a line was last written
        self._width = 0  # the length of the line on screen (terminal)
        self.jobs_done = 0
        self.units_done = 0

    def line(self, jobs_done: int, units_done: int, elapsed: float) -> str:
        """The progress line, at most WIDTH - 1 characters."""
        parts = [f"{jobs_done:,}/{self.jobs:,} jobs"]
        if self.units is not None:
            parts.append(f"{units_done:,}/{self.units:,} {self.unit}")
        parts.append(f"{_duration(elapsed)} elapsed")
        total, done = (self.units, units_done) if self.units else (self.jobs, jobs_done)
        if 0 < done < total:
            parts.append(f"{_duration(elapsed / done * (total - done))} left")
        line = "  ".join(parts)
        if len(line) >= WIDTH:  # huge counts: tighter before anything is cut
            line = " ".join(parts)
        if self.label and len(self.label) + 2 + len(line) < WIDTH:
            line = f"{self.label}: {line}"
        return line[:WIDTH - 1]

    def update(self, jobs_done: int, units_done: int | None = None, force: bool = False) -> None:
        """Shows the progress when it is due (at most every REDRAW_SECONDS on a terminal,
        LOG_SECONDS otherwise), and always when every job is done or `force`."""
        self.jobs_done = jobs_done
        self.units_done = jobs_done if units_done is None else units_done
        now = self.clock()
        every = REDRAW_SECONDS if self.interactive else LOG_SECONDS
        if not force and jobs_done < self.jobs and now - self._shown < every:
            return
        self._shown = now
        line = self.line(self.jobs_done, self.units_done, now - self.start)
        if self.interactive:
            self.stream.write("\r" + line.ljust(self._width))  # pads over a longer previous line
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the line on a terminal, so that what follows starts on a line of its own."""
        if self.interactive and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def run_jobs(fn: Callable[..., Any], calls: Sequence[tuple], *, local: bool = False, address: str | None = None,
             sizes: Sequence[int] | None = None, unit: str = "episodes", label: str = "",
             stream: TextIO | None = None, cpus: float = 1.0) -> list[Any]:
    """`fn(*call)` for every call; results in call order.

    local: one after another in this process (an exception of a job is raised as it is);
    otherwise Ray tasks of `cpus` CPUs each, on the cluster at `address` or an embedded Ray with all
    cores (Ray queues what does not fit and retries a task whose process died; a job that raised
    ends the command with SystemExit naming `label` and the error). Ray is stopped afterwards.
    sizes: each call's units of work (`unit`, e.g. its episodes) for the progress display.
    label: the command, for the display and errors. stream: the display's (default stderr)."""
    calls = list(calls)
    if sizes is not None and len(sizes) != len(calls):
        raise ValueError(f"run_jobs: {len(sizes)} sizes for {len(calls)} calls")
    progress = Progress(len(calls), None if sizes is None else sum(sizes), unit, label, stream)
    size = (lambda i: 1) if sizes is None else (lambda i: int(sizes[i]))
    results: list[Any] = [None] * len(calls)
    try:
        progress.update(0, 0, force=True)
        if local:
            units = 0
            for i, call in enumerate(calls):
                results[i] = fn(*call)
                units += size(i)
                progress.update(i + 1, units)
        else:
            _run_on_ray(fn, calls, address, results, progress, size, label or "choreo", cpus)
    finally:
        progress.close()
    return results


def _run_on_ray(fn: Callable[..., Any], calls: list[tuple], address: str | None, results: list[Any],
                progress: Progress, size: Callable[[int], int], label: str, cpus: float = 1.0) -> None:
    from choreo.launch.runtime.ray_runtime import connect_ray, shutdown_ray, start_local_ray

    if address:
        connect_ray(address)
    else:
        start_local_ray(num_cpus=os.cpu_count() or 1)
    import ray

    try:
        task = ray.remote(num_cpus=cpus, max_retries=3)(fn)
        # Large arguments (acting weights) go to the object store once, not once per task.
        shared: dict[int, Any] = {}
        pending = {}
        for i, call in enumerate(calls):
            args = []
            for a in call:
                if isinstance(a, dict):
                    if id(a) not in shared:
                        shared[id(a)] = ray.put(a)
                    a = shared[id(a)]
                args.append(a)
            pending[task.remote(*args)] = i
        done = units = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                done += 1
                units += size(i)
            progress.update(done, units)
    except ray.exceptions.RayTaskError as exc:  # a job's environment or policy raised, after its retries
        raise SystemExit(f"{label}: a job failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        shutdown_ray()
