"""`choreo pretrain` and `choreo finetune`: resolve the config, prepare the run directory, and run
the loop of the mode (the same loops, local or on Ray, for both)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from pathlib import Path

from choreo.launch.runtime.config import (RESUME_OVERRIDES, Config, ConfigError, load_config, read_config_file,
                                         with_overrides)
from choreo.launch.runtime.plan import resolve_plan
from choreo.launch.runtime.rundir import RunDir
from choreo.launch.runtime.signals import interrupt_on_sigterm


def pretrain(args: argparse.Namespace) -> int:
    """`choreo pretrain`: skills without rewards."""
    return run_mode(args, "pretrain")


def finetune(args: argparse.Namespace) -> int:
    """`choreo finetune --snapshot FILE task=TASK` (or `--from-scratch`): adapt to a task."""
    return run_mode(args, "finetune")


def mode_overrides(args: argparse.Namespace, mode: str) -> list[str]:
    """The command's own keys, before the user's overrides: the mode and, for fine-tuning, where it
    starts from (the snapshot as an absolute path, so that the saved config works from anywhere)."""
    if mode != "finetune":
        if getattr(args, "collect", False) and not getattr(args, "offline", None):
            raise ConfigError("--collect keeps collecting after a dataset is loaded: give it with --offline DIR")
        if getattr(args, "offline", None):
            from choreo.buffer.dataset import is_minari

            # A folder as an absolute path, so that the saved config works from anywhere.
            location = args.offline if is_minari(args.offline) else Path(args.offline).expanduser().resolve()
            return [f"mode={mode}", f"dataset.dir={location}"] + (["dataset.collect=true"] if args.collect else [])
        return [f"mode={mode}"]
    if bool(args.snapshot) == bool(args.from_scratch):
        raise ConfigError("choreo finetune needs exactly one of --snapshot FILE (a pretraining snapshot, "
                          "runs/<run>/snapshots/snapshot_<frames>.pt) and --from-scratch")
    if args.from_scratch:
        return ["mode=finetune", "from_scratch=true"]
    return ["mode=finetune", f"snapshot={Path(args.snapshot).expanduser().resolve()}"]


def check_snapshot(config: Config) -> None:
    """Refuse, before anything starts, a snapshot that does not fit the run (another domain,
    observation type, action size or network size), or a path that is no snapshot file: the message
    names the file and what differs."""
    from choreo.launch.runtime.snapshot import Snapshot
    from choreo.learner.snapshot import SnapshotError

    try:
        Snapshot.open(config.snapshot, config=config).make_agent()
    except SnapshotError as e:
        raise ConfigError(str(e)) from None


def check_dataset_before_start(config: Config) -> None:
    """A dataset folder that is missing, empty or has a broken manifest, or a Minari dataset that
    is not installed locally (or minari itself is not), is refused before the run directory is made."""
    from choreo.buffer.dataset import DatasetError
    from choreo.launch.runtime.build import check_dataset

    try:
        check_dataset(config)
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def run_mode(args: argparse.Namespace, mode: str) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    if getattr(args, "tasks", None) or getattr(args, "seeds", None):
        return run_many(args, mode)
    fitted = None
    if args.resume:
        if args.preset:
            raise ConfigError("--resume continues a run with its saved config; drop --preset")
        if getattr(args, "config", None):
            raise ConfigError(f"--resume continues a run with the config saved in its run directory; drop --config "
                              f"{args.config} (key=value may still change how long it runs, e.g. "
                              f"learner.total_frames=4e6)")
        run_dir = RunDir.resume(args.resume)
        config = run_dir.read_config()
        saved = resolve_plan(config).mode
        if saved != mode:
            raise ConfigError(f"cannot resume {run_dir} with choreo {mode}: it is a {saved} run; "
                              f"continue it with choreo {saved} --resume {run_dir}")
        if args.overrides:  # e.g. learner.total_frames=4000000 to run on past the planned end
            try:
                config = with_overrides(config, args.overrides, RESUME_OVERRIDES)
            except ConfigError as e:
                raise ConfigError(f"--resume continues a run with its saved config: {e}") from None
            run_dir.write_config(config)
        check_local(config, args.local)
    else:
        file = read_config_file(args.config) if getattr(args, "config", None) else None
        overrides = list(args.overrides)
        presets = list(args.preset)
        if getattr(args, "fit_machine", False):
            from choreo.launch.runtime.machine import fitted_presets

            # A size the config file chooses is a size given, as --preset or size= is.
            chosen = [f"{group}={name}" for group, name in file.groups.items()] if file else []
            presets, fitted = fitted_presets(presets, [*chosen, *overrides])
        config = load_config(presets, mode_overrides(args, mode) + overrides, file)
        plan = resolve_plan(config)
        if plan.mode != mode:
            raise ConfigError(f"config key 'mode': choreo {mode} runs mode={mode}, not {plan.mode}")
        check_local(config, args.local)
        if args.logdir:
            config = dataclasses.replace(config, logdir=args.logdir)
        if plan.start == "snapshot":
            check_snapshot(config)
        if plan.dataset:
            check_dataset_before_start(config)
        run_dir = RunDir.create(config, args.logdir)
    # The first lines of the output, flushed: stdout is block-buffered when it goes to a file or a
    # pipe (a cluster job's log), and what the loop writes next (Ray's start-up, progress on stderr)
    # would otherwise come before them.
    first = f"run directory: {run_dir}"
    if fitted:  # what the run is and how long it takes here, on the same first line
        from choreo.launch.runtime.machine import first_line

        first += f"; {first_line(config, fitted)}"
    print(f"{first}\nTensorBoard:   tensorboard --logdir {run_dir} --host 127.0.0.1", flush=True)

    interrupt_on_sigterm()

    from choreo.buffer.dataset import DatasetError

    try:
        if args.local:
            from choreo.launch.runtime.local import run_local

            return run_local(config, run_dir.path, resume=bool(args.resume))
        from choreo.launch.runtime.distributed import run_distributed

        return run_distributed(config, run_dir.path, address=args.address, resume=bool(args.resume))
    except DatasetError as e:  # e.g. no episode of the dataset fits the task (each file was named above)
        raise ConfigError(str(e)) from None


def check_local(config: Config, local: bool) -> None:
    if local and config.learner.num_learners > 1:
        raise ConfigError(f"config key 'learner.num_learners': {config.learner.num_learners} learners train "
                          f"as Ray actors; drop --local (an embedded Ray starts on this machine)")


def _split(text: str | None, what: str, kind: type) -> list:
    if not text:
        return []
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} takes a comma-separated list, got {text!r}") from None
    if len(set(items)) != len(items):
        raise ConfigError(f"--{what} names an item twice: {text!r}")
    return items


def run_many(args: argparse.Namespace, mode: str) -> int:
    """`--tasks a,b --seeds 0,1,2`: one run per (task, seed), each in `<logdir>/<run_name>/<task>-seed<seed>`,
    side by side on Ray (launch/runtime/sweep.py)."""
    if args.local or args.resume:
        raise ConfigError("--tasks/--seeds start many runs side by side on Ray: drop --local and --resume "
                          "(continue one run of them with --resume <its run directory>)")
    file = read_config_file(args.config) if getattr(args, "config", None) else None
    overrides = list(args.overrides)
    base = load_config(args.preset, mode_overrides(args, mode) + overrides, file)
    if args.logdir:
        base = dataclasses.replace(base, logdir=args.logdir)
    if base.learner.num_learners > 1:
        raise ConfigError("config key 'learner.num_learners': runs side by side (--tasks/--seeds) train on one "
                          "learner each; start a run of several learners on its own")
    tasks = _split(args.tasks, "tasks", str) or [base.env.task]
    seeds = _split(args.seeds, "seeds", int) or [base.seed]
    configs, checked = [], set()
    for task in tasks:
        for seed in seeds:
            config = load_config(args.preset, mode_overrides(args, mode) + overrides
                                 + [f"env.task={task}", f"seed={seed}",
                                    f"run_name={re.sub(r'[^A-Za-z0-9._-]+', '_', task)}-seed{seed}"], file)
            if resolve_plan(config).start == "snapshot" and task not in checked:
                check_snapshot(config)  # before any directory is made
                checked.add(task)
            configs.append(config)
    named = dataclasses.replace(base, run_name=base.run_name or f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    parent = RunDir.create(named, args.logdir, write_config=False)
    runs = []
    for config in configs:
        config = dataclasses.replace(config, logdir=str(parent))
        runs.append((config, RunDir.create(config, parent.path).path))
    print(f"{len(runs)} runs ({len(tasks)} tasks x {len(seeds)} seeds) in {parent}\n"
          f"TensorBoard:   tensorboard --logdir {parent} --host 127.0.0.1\n"
          f"results:       choreo report {parent}", flush=True)
    from choreo.launch.runtime.sweep import run_sweep

    return run_sweep(runs, address=args.address, parallel=args.parallel)
