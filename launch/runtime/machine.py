"""Fitting a run to the machine it starts on (`choreo pretrain --fit-machine`, what `make run` does).

An update at the paper's sizes takes about 16 s on a 2-core CPU and the reference trains once
every 10 frames, so a paper-size pretraining from states would take weeks there. Without a GPU,
a run that names no size therefore takes the `small` size (configs/size/small.yaml), which learns
on a CPU; with one it keeps the paper's. A size given with `--preset` or `size=` always wins.

The first line says which size was taken and why, how long the run is and how long it will take
here, and what that rests on: the learner's update is timed on this machine (on a random batch of
the run's shape, after a warm-up, the fastest of several timed updates), and the run is
learner-bound at this ratio, so the time is its updates times that. The fastest update, not the
mean of a few: another process busy on the cores for a moment (a build, a test run) makes the
updates of that moment many times slower, and a mean over them puts the run at many times its
length. When other processes keep the cores busy all along, no choice of updates helps: the line
then says how busy they kept them (Linux), so that its figure is read as what it is. The progress
line's own estimate, from the run's measured pace, follows once it has one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from choreo.launch.runtime.config import Config, available_presets, warmup_steps

WARMUP_UPDATES = 2
"""Untimed updates before the timed ones: the first ones allocate memory and pick kernels."""
TIMED_UPDATES = (5, 30)
"""The fewest and the most timed updates of the start-up estimate ..."""
TIMING_SECONDS = 5.0
"""... which goes on past the fewest until this many seconds were spent timing."""
BUSY_SHARE = 0.25
"""The share of the cores other processes kept busy while the updates were timed above which the
first line says the estimate may be long."""
START_SECONDS = 30.0
"""Starting Ray and the workers, and the random warm-up's frames, before the first update."""


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def size_given(presets: Sequence[str], overrides: Sequence[str]) -> bool:
    sizes = set(available_presets()["size"])
    return any(p in sizes for p in presets) or any(o.split("=", 1)[0].strip() == "size" for o in overrides)


def fitted_presets(presets: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], str | None]:
    """The presets with `small` added when no size was given and there is no GPU; and why (None:
    unchanged)."""
    if size_given(presets, overrides):
        return list(presets), None
    if has_gpu():
        return list(presets), "a GPU is here: the paper's sizes"
    return [*presets, "small"], "no GPU here: the small size (--preset paper forces the paper's)"


@dataclass(frozen=True)
class UpdateTiming:
    """The learner's update timed on this machine."""

    seconds: float
    """The fastest timed update, in seconds: what the machine does when nothing else holds its cores."""
    median: float
    """The median timed update, in seconds."""
    count: int
    """Updates timed."""
    others_busy: float | None = None
    """The share of the machine's cores that other processes kept busy meanwhile (None: unknown)."""


def time_updates(update: Callable[[], object], warmup: int = WARMUP_UPDATES, fewest: int = TIMED_UPDATES[0],
                 most: int = TIMED_UPDATES[1], budget: float = TIMING_SECONDS,
                 clock: Callable[[], float] = time.perf_counter) -> UpdateTiming:
    """Calls `update` `warmup` times untimed, then times it: at least `fewest` times, and on until
    `budget` seconds were spent timing or `most` calls were timed."""
    for _ in range(warmup):
        update()
    times: list[float] = []
    start = clock()
    while len(times) < max(fewest, 1) or (len(times) < most and clock() - start < budget):
        t0 = clock()
        update()
        times.append(clock() - t0)
    ordered = sorted(times)
    return UpdateTiming(ordered[0], ordered[len(ordered) // 2], len(ordered))


def seconds_per_update(config: Config) -> UpdateTiming:
    """The learner's update of `config`'s agent on this machine (random batches of the run's shape)."""
    import numpy as np
    import torch

    from choreo.agents.registry import make_agent
    from choreo.launch.runtime.build import random_batch
    from choreo.launch.runtime.build import env_shapes

    obs_shape, action_dim = env_shapes(config)
    agent = make_agent(config.algo, obs_shape, action_dim, config.agent, seed=0, device=config.learner.device)
    rb = config.replay
    skill_dim = config.agent.dads.skill_dim if config.algo == "dads" else 0
    batch = random_batch(np.random.default_rng(0), obs_shape, rb.batch_size, rb.batch_length,
                         action_dim=action_dim, skill_dim=skill_dim)
    threads = torch.get_num_threads()
    if config.learner.threads:
        torch.set_num_threads(config.learner.threads)
    try:
        before = _cpu_seconds(), time.process_time()
        timing = time_updates(lambda: agent.update(batch))
        after = _cpu_seconds(), time.process_time()
    finally:
        torch.set_num_threads(threads)
    if before[0] is None or after[0] is None or after[0][1] <= before[0][1]:
        return timing
    others = (after[0][0] - before[0][0]) - (after[1] - before[1])  # busy CPU seconds not ours
    return dataclasses.replace(timing, others_busy=min(max(others / (after[0][1] - before[0][1]), 0.0), 1.0))


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of every core since boot, from Linux's /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if len(ticks) < 5:
        return None
    total = sum(ticks)
    return (total - ticks[3] - ticks[4]) / per_second, total / per_second


CPU_SHARE = 1.2
"""How much longer a CPU learner's update takes inside a run than alone: it shares the cores with
the environment workers, the replay shard, its prefetch thread and the driver. Measured here
(2 cores, small size, `make run`): 0.49 to 0.50 s an update over the run's first 5,600 frames
against 0.41 s alone."""


def run_estimate(config: Config) -> tuple[int, float, UpdateTiming, float]:
    """(updates, seconds, timing, share) of the whole run here: one update per `batch steps /
    samples_per_insert` agent steps after the warm-up, each as long as the fastest timed now times
    `share` (CPU_SHARE for a learner on the CPU, else 1), after START_SECONDS."""
    from choreo.agents.choreographer.agent import resolve_device

    rc = config.replay
    steps = config.learner.total_frames / config.env.action_repeat
    updates = int(max(steps - warmup_steps(config), 0) * rc.samples_per_insert / (rc.batch_size * rc.batch_length))
    share = CPU_SHARE if resolve_device(config.learner.device).type == "cpu" else 1.0
    timing = seconds_per_update(config)
    return updates, START_SECONDS + updates * timing.seconds * share, timing, share


def first_line(config: Config, why: str) -> str:
    """What the run is, how long it takes here and what that rests on, for the first line of `make run`."""
    updates, seconds, timing, share = run_estimate(config)
    minutes = seconds / 60
    took = f"about {minutes:.0f} minutes" if minutes < 120 else f"about {minutes / 60:.1f} hours"
    took = "about a minute" if minutes < 1.5 else took
    shared = f", x {share:g} for the cores the workers share" if share != 1.0 else ""
    busy = ""
    if timing.others_busy is not None and timing.others_busy > BUSY_SHARE:
        busy = (f"; other processes kept {timing.others_busy:.0%} of the {os.cpu_count()} cores busy meanwhile, "
                f"so it may be long")
    return (f"{why}: {config.algo} on {config.env.task} from {config.env.obs}, {config.learner.total_frames:,} frames, "
            f"{updates:,} updates; {took} here ({updates:,} updates x {timing.seconds:.3g} s, the fastest of "
            f"{timing.count} updates timed on this machine after a warm-up{shared}{busy}); the progress line's "
            f"estimate follows once the run has its pace")
