"""`choreo export RUN_DIR --out DIR`: a run's replay as an ExORL-style dataset, so that data
collected once can be shared and pretrained from again (`choreo pretrain --offline DIR`).

The replay checkpoint of every shard is read (`<run>/replay/shard<i>.msgpack`, written at each
checkpoint) and each run of held steps (an episode, or the part of it the replay still holds) is
written as one `.npz` with the batch layout's keys, flags and stamps included, so that loading the
export gives back the same steps bit for bit; `manifest.json` holds every file's SHA-256.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from choreo.buffer.codec import CodecError
from choreo.buffer.dataset import MANIFEST, DatasetError, export_episodes
from choreo.buffer.shard import CheckpointMismatchError
from choreo.launch.runtime.build import make_shard
from choreo.launch.runtime.config import ConfigError
from choreo.launch.runtime.plan import resolve_plan
from choreo.launch.runtime.rundir import RunDir


def replay_episodes(path: str | Path) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(shards, the episodes of every shard of the run's last replay checkpoint, shard by shard,
    oldest first). Raises ConfigError naming the run and what is missing."""
    run_dir = RunDir.open(path)
    config = run_dir.read_config()
    if not resolve_plan(config).workers:
        raise ConfigError(f"{run_dir} trained on the dataset {config.dataset.dir} alone: its replay is that dataset, "
                          f"and it saved none")
    shards = []
    for i in range(config.num_shards):
        shard = make_shard(config, i)
        try:
            shard.load(run_dir.replay)
        except FileNotFoundError:
            raise ConfigError(f"{run_dir} holds no replay checkpoint {shard.checkpoint_path(run_dir.replay)}: "
                              f"a run saves its replay at each checkpoint (learner.checkpoint_minutes) and when it "
                              f"stops") from None
        except (CodecError, CheckpointMismatchError) as e:
            raise ConfigError(str(e)) from None
        shards.append(shard)
    return len(shards), itertools.chain.from_iterable(shard.episodes() for shard in shards)


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, int]:
    """Writes the run's replay into `out` as per-episode `.npz` files and a manifest; prints
    progress and a summary line; returns {"episodes", "steps"}."""
    run_dir, out = Path(run_dir).expanduser().resolve(), Path(out).expanduser()
    RunDir.open(run_dir)  # a wrong run directory is named before the folder
    check_out(out)
    num_shards, episodes = replay_episodes(run_dir)
    start = last = time.monotonic()

    def progress(count: int, steps: int) -> None:
        nonlocal last
        if time.monotonic() - last > 5.0:
            last = time.monotonic()
            print(f"exporting: {count:,} episodes, {steps:,} steps", flush=True)

    try:
        result = export_episodes(episodes, out, source=str(run_dir), progress=progress)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {result['episodes']:,} episodes, {result['steps']:,} steps from {num_shards} replay "
          f"shard{'s' if num_shards != 1 else ''} of {run_dir} to {out} in {time.monotonic() - start:.1f} s "
          f"({MANIFEST} holds the SHA-256 of every file)", flush=True)
    return result


def check_out(out: Path) -> None:
    """`--out` must be a new or an empty folder: a dataset is never mixed with other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; export into a new or empty folder")
    present = sorted(p.name for p in out.iterdir())
    if present:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise ConfigError(f"--out {out}: the folder is not empty (it holds {shown}); export into a new or "
                          f"empty folder")


def main(args: argparse.Namespace) -> int:
    export_run(args.run_dir, args.out)
    return 0
