"""Fitting a run to the machine it starts on (`choreo pretrain --fit-machine`, what `make run` does).

An update at the paper's sizes takes about 16 s on a 2-core CPU and the reference trains once
every 10 frames, so a paper-size pretraining from states would take weeks there. Without a GPU,
a run that names no size therefore takes the `small` size (configs/size/small.yaml), which learns
on a CPU; with one it keeps the paper's. A size given with `--preset` or `size=` always wins.

The first line says which size was taken and why, how long the run is and how long it will take
here: the learner's update is timed on this machine (a few updates on a random batch of the run's
shape), and the run is learner-bound at this ratio, so the time is its updates times that.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from choreo.launch.runtime.config import Config, available_presets

CALIBRATION_UPDATES = 3
"""Timed updates (after one untimed) of the start-up estimate."""
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


def seconds_per_update(config: Config, updates: int = CALIBRATION_UPDATES) -> float:
    """The learner's update of `config`'s agent on this machine, in seconds (random batches of the
    run's shape)."""
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
        agent.update(batch)
        start = time.perf_counter()
        for _ in range(updates):
            agent.update(batch)
        return (time.perf_counter() - start) / updates
    finally:
        torch.set_num_threads(threads)


CPU_SHARE = 1.2
"""How much longer a CPU learner's update takes inside a run than alone: it shares the cores with
the environment workers, the replay shard, its prefetch thread and the driver. Measured here
(2 cores, small size, `make run`): 0.49 to 0.50 s an update over the run's first 5,600 frames
against 0.41 s alone."""


def run_estimate(config: Config) -> tuple[int, float]:
    """(updates, seconds) of the whole run here: one update per `batch steps / samples_per_insert`
    agent steps after the warm-up, each as long as measured now (times CPU_SHARE for a learner on
    the CPU), after START_SECONDS."""
    from choreo.agents.choreographer.agent import resolve_device

    rc = config.replay
    steps = config.learner.total_frames / config.env.action_repeat
    updates = int(max(steps - rc.min_size, 0) * rc.samples_per_insert / (rc.batch_size * rc.batch_length))
    share = CPU_SHARE if resolve_device(config.learner.device).type == "cpu" else 1.0
    return updates, START_SECONDS + updates * seconds_per_update(config) * share


def first_line(config: Config, why: str) -> str:
    """What the run is and how long it takes here, for the first line of `make run`."""
    updates, seconds = run_estimate(config)
    minutes = seconds / 60
    took = f"about {minutes:.0f} minutes" if minutes < 120 else f"about {minutes / 60:.1f} hours"
    return (f"{why}: {config.algo} on {config.env.task} from {config.env.obs}, {config.learner.total_frames:,} frames, "
            f"{updates:,} updates, {took} here at the learner's measured pace")
