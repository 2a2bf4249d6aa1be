"""`choreo export RUN_DIR --out DIR`: a run's replay as an ExORL-style dataset, so that data
collected once can be shared and pretrained from again (`choreo pretrain --offline DIR`);
`--format minari [--dataset-id ID]`: as a Minari dataset (`choreo pretrain --offline minari:ID`).

The replay checkpoint of every shard is read (`<run>/replay/shard<i>.msgpack`, written at each
checkpoint) and each run of held steps (an episode, or the part of it the replay still holds) is
written as one `.npz` with the batch layout's keys, flags and stamps included, so that loading the
export gives back the same steps bit for bit; `manifest.json` holds every file's SHA-256.

A Minari export goes where Minari keeps its local datasets (`MINARI_DATASETS_PATH`, else
`~/.minari/datasets`), which is where `minari.load_dataset` and `--offline minari:ID` look: a
dataset in another folder would be found by neither, so there is no `--out` for it. Each run is
one Minari episode, with the flags and stamps in its infos (`buffer/dataset.py`), so that it too
loads back bit for bit; runs of a single step hold no transition and are left out (said).
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from choreo.buffer.codec import CodecError
from choreo.buffer.dataset import MANIFEST, DatasetError, export_episodes, export_minari, new_minari_path
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


def progress_printer(every_s: float = 5.0) -> Callable[[int, int], None]:
    """progress(episodes, steps): a line at most every `every_s` seconds, for long exports."""
    last = time.monotonic()

    def progress(count: int, steps: int) -> None:
        nonlocal last
        if time.monotonic() - last > every_s:
            last = time.monotonic()
            print(f"exporting: {count:,} episodes, {steps:,} steps", flush=True)

    return progress


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, int]:
    """Writes the run's replay into `out` as per-episode `.npz` files and a manifest; prints
    progress and a summary line; returns {"episodes", "steps"}."""
    run_dir, out = Path(run_dir).expanduser().resolve(), Path(out).expanduser()
    RunDir.open(run_dir)  # a wrong run directory is named before the folder
    check_out(out)
    num_shards, episodes = replay_episodes(run_dir)
    start = time.monotonic()
    progress = progress_printer()

    try:
        result = export_episodes(episodes, out, source=str(run_dir), progress=progress)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {result['episodes']:,} episodes, {result['steps']:,} steps from {num_shards} replay "
          f"shard{'s' if num_shards != 1 else ''} of {run_dir} to {out} in {time.monotonic() - start:.1f} s "
          f"({MANIFEST} holds the SHA-256 of every file)", flush=True)
    return result


def export_run_minari(run_dir: str | Path, dataset_id: str | None = None) -> dict[str, Any]:
    """Writes the run's replay as the local Minari dataset `dataset_id` (default
    `choreo/<run name>-v0`); prints progress and a summary line; returns {"episodes", "steps",
    "left_out", "path"}."""
    run_dir = Path(run_dir).expanduser().resolve()
    config = RunDir.open(run_dir).read_config()
    dataset_id = dataset_id or default_dataset_id(run_dir)
    try:
        new_minari_path(dataset_id)  # a taken id is said before the replay is read
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    num_shards, episodes = replay_episodes(run_dir)
    start = time.monotonic()
    progress = progress_printer()

    description = (f"The replay of the choreo run {run_dir.name} ({config.algo}, task {config.env.task}, "
                   f"{config.env.obs}).")
    try:
        result = export_minari(episodes, dataset_id, description, config.algo, progress)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    left_out = (f"; {result['left_out']:,} run{'s' if result['left_out'] != 1 else ''} of a single step left out "
                f"(a Minari episode needs a step after its first observation)") if result["left_out"] else ""
    print(f"exported {result['episodes']:,} episodes, {result['steps']:,} steps from {num_shards} replay "
          f"shard{'s' if num_shards != 1 else ''} of {run_dir} as the Minari dataset {dataset_id} at "
          f"{result['path']} in {time.monotonic() - start:.1f} s{left_out}; train on it with "
          f"choreo pretrain --offline minari:{dataset_id}", flush=True)
    return result


def default_dataset_id(run_dir: Path) -> str:
    """`choreo/<run name>-v0`, the run's name made a Minari dataset name (letters, digits, - and _)."""
    name = re.sub(r"[^\w-]+", "_", run_dir.name).strip("_-") or "run"
    return f"choreo/{name}-v0"


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
    if args.format == "minari":
        if args.out is not None:
            raise ConfigError(f"--out: a Minari dataset goes to Minari's local datasets folder, where "
                              f"minari.load_dataset and --offline minari:ID find it; to put it under {args.out}, "
                              f"set MINARI_DATASETS_PATH={args.out}")
        export_run_minari(args.run_dir, args.dataset_id)
        return 0
    if args.dataset_id is not None:
        raise ConfigError("--dataset-id names a Minari dataset: give it with --format minari")
    if args.out is None:
        raise ConfigError("choreo export --format npz needs --out DIR, a new or empty folder for the dataset")
    export_run(args.run_dir, args.out)
    return 0
