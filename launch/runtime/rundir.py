"""The run directory: <logdir>/<run_name>, created only new or empty, continued only with a complete
checkpoint."""

from __future__ import annotations

import os
import re
import time
import zipfile
from pathlib import Path

from choreo.launch.runtime.config import Config, ConfigError, check_run_name
from choreo.learner.learner import CHECKPOINT


RUN_FILES = ("config.yaml", CHECKPOINT, "replay", "snapshots", "tensorboard", "placement.json")
"""What a run writes into its directory; any of them marks the directory as taken."""


def _listing(names: list[str], run_dir: Path, limit: int = 8) -> str:
    shown = [n + ("/" if (run_dir / n).is_dir() else "") for n in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def default_run_name(config: Config) -> str:
    """<task>-<algo>-<time>, with every character outside [A-Za-z0-9._-] of the task as '_'
    (a gym id such as gym:ale_py:ALE/Pong-v5 holds ':' and '/')."""
    task = re.sub(r"[^A-Za-z0-9._-]+", "_", config.env.task).strip("._") or "run"
    return f"{task}-{config.algo}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(config: Config, logdir: str | None) -> Path:
    """Create the run directory <logdir>/<run_name> and return its resolved path. Refuses (ConfigError,
    nothing created or changed) a run_name that is not one plain name, a path that resolves outside
    logdir (a symbolic link), a file in its place, and a directory that is not empty, so that two runs
    never mix and no earlier run's file is overwritten."""
    check_run_name(config.run_name)
    root = Path(logdir or config.logdir).expanduser()
    name = config.run_name or default_run_name(config)
    if not config.run_name:  # a generated name never collides: runs started within a second get -2, -3, ...
        base, n = name, 1
        while (root / name).exists() or (root / name).is_symlink():
            n += 1
            name = f"{base}-{n}"
    given = root / name
    try:
        root_resolved = root.resolve()
        run_dir = given.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ConfigError(f"run directory {given}: cannot resolve the path ({e})") from None
    if run_dir == root_resolved or not run_dir.is_relative_to(root_resolved):
        raise ConfigError(f"run directory {given} resolves to {run_dir}, outside logdir {root_resolved} "
                          f"(a symbolic link?); runs are written only inside logdir: choose another run_name")
    if root_resolved.exists() and not root_resolved.is_dir():
        raise ConfigError(f"logdir {root} is not a directory")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} exists and is not a directory; choose another run_name")
        try:
            present = sorted(p.name for p in run_dir.iterdir())
        except OSError as e:
            raise ConfigError(f"run directory {run_dir} cannot be read: {e.strerror}") from None
        if CHECKPOINT in present:
            raise ConfigError(f"run directory {run_dir} already holds a run (it has {CHECKPOINT}); continue it with "
                              f"`choreo pretrain --resume {run_dir}` or choose another run_name")
        taken = [n for n in present if n in RUN_FILES]
        if taken:
            raise ConfigError(
                f"run directory {run_dir} holds a run that stopped before its first checkpoint (it has "
                f"{_listing(taken, run_dir)} but no {CHECKPOINT}); --resume needs {CHECKPOINT}, and a new run "
                f"is not mixed into an old one: choose another run_name (or move that directory away yourself)"
            )
        if present:
            raise ConfigError(f"run directory {run_dir} is not empty (it holds {_listing(present, run_dir)}); "
                              f"a run starts only in a new or empty directory: choose another run_name")
    else:
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            raise ConfigError(f"run directory {run_dir} was created by someone else just now; "
                              f"choose another run_name") from None
        except OSError as e:
            raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    return run_dir


def resumable_run_dir(path: str | os.PathLike) -> Path:
    """The resolved run directory to continue, after checking that it holds config.yaml and a
    complete checkpoint. Errors name the directory and what is missing; nothing is changed."""
    given = Path(path).expanduser()
    if not given.exists():
        raise ConfigError(f"cannot resume {given}: no such directory")
    if not given.is_dir():
        raise ConfigError(f"cannot resume {given}: it is not a directory (give the run directory, "
                          f"e.g. runs/<run>, not a file in it)")
    run_dir = given.resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"cannot resume {run_dir}: it holds no config.yaml, so it is not a run directory "
                          f"(choreo pretrain writes <logdir>/<run_name>/config.yaml when a run starts)")
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it holds no {CHECKPOINT}: the run stopped before its first "
                          f"checkpoint (written every learner.checkpoint_minutes, at each snapshot and when a run "
                          f"ends), so there is nothing to continue; start a new run with another run_name")
    try:  # torch checkpoints are zip archives: a truncated one has no central directory
        with zipfile.ZipFile(checkpoint) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"cannot resume {run_dir}: {CHECKPOINT} is damaged or not a checkpoint ({e}); "
                          f"nothing was changed") from None
    return run_dir
