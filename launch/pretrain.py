"""`choreo pretrain`: resolve the config, prepare the run directory, and run the loop."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import time
from pathlib import Path

from launch.config import Config, ConfigError, from_yaml_file, load_config, save_config
from learner.learner import CHECKPOINT


def new_run_dir(config: Config, logdir: str | None) -> Path:
    root = Path(logdir or config.logdir)
    name = config.run_name or f"{config.env.task.replace(':', '_')}-{config.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (root / name).resolve()
    if (run_dir / CHECKPOINT).exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                          f"or choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def pretrain(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.resume:
        run_dir = Path(args.resume).resolve()
        if args.preset or args.overrides:
            raise ConfigError("--resume continues a run with its saved config; drop --preset and key=value")
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"cannot resume {run_dir}: it holds no config.yaml")
        if not (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"cannot resume {run_dir}: it holds no {CHECKPOINT} yet")
        config = from_yaml_file(run_dir / "config.yaml")
    else:
        config = load_config(args.preset, args.overrides)
        if args.logdir:
            config = dataclasses.replace(config, logdir=args.logdir)
        run_dir = new_run_dir(config, args.logdir)
        save_config(config, run_dir)
    print(f"run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir} --host 127.0.0.1")

    interrupt_on_sigterm()

    if args.local:
        from launch.local import run_local

        return run_local(config, run_dir, resume=bool(args.resume))
    from launch.distributed import run_distributed

    return run_distributed(config, run_dir, address=args.address, resume=bool(args.resume))


def interrupt_on_sigterm() -> None:
    """A scheduler's or a user's SIGTERM ends the run like Ctrl-C: with a final checkpoint.
    (Call again after `ray.init`, which installs a handler of its own.)"""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
