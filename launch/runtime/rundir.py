"""The run directory, <logdir>/<run_name>: the one owner of its layout, its creation and resume
checks, its evaluation records and its atomic writes. Every command names the files of a run
through `RunDir`, so that a file is called the same wherever it is written or read:

    config.yaml         the resolved config, written when the run starts
    checkpoint.pt       the learner's last checkpoint (the learner names it, `learner/files.py`)
    snapshots/          snapshot_<frames>.pt, or snapshot_<updates>updates.pt offline (the learner's)
    replay/             the replay shards' checkpoints
    tensorboard/        the event files
    placement.json      the nodes of the learner, workers and shards (runs on Ray)
    driver.log          the driver's output, for a run of several side by side
    ray.log             Ray's own messages to the driver (CHOREO_RAY_LOGS=1: the terminal instead)
    eval.jsonl          one evaluation per line (`EvalRecord`), read by `choreo report`
    zero_shot.jsonl     `choreo evaluate`: one line per job; zero_shot.json, its summary
    plan.jsonl          `choreo plan`: one line per episode; plan.json, its summary

A run directory is created only new or empty, and continued only when it holds its config and a
complete checkpoint. Evaluations are appended and synced line by line (a crash loses at most the
line being written); summaries and results are written to a temporary file that then replaces the
old one (a crash leaves the old file or the new one, never a part).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from choreo.launch.runtime.config import RUN_CONFIG, Config, ConfigError, check_run_name, from_yaml_file, to_yaml
from choreo.learner.files import CHECKPOINT, SNAPSHOT_PATTERN, SNAPSHOTS, snapshot_name
from choreo.vocabulary import write_atomically

EVAL_MODES = ("finetune", "scratch", "zero_shot", "plan", "plan_random", "pretrain")
"""What an evaluation record's `mode` says made it: a fine-tuning run from a snapshot or from
scratch, a zero-shot evaluation, `choreo plan` (planning or random skills), a pretraining run."""

DEFAULT_EVAL_MODE = "finetune"
"""The mode of a line without one (written before records named their mode)."""

RESULTS = ("zero_shot", "plan")
"""The results a command writes into a run directory of its own: <kind>.jsonl and <kind>.json."""


class EvalRecordError(ValueError):
    """A line of an evaluation file that is not a record; the message starts with `file:line`."""


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> int | None:
    """value as an int when it is a whole number (10000 or 10000.0), else None."""
    if _finite(value) and float(value).is_integer():
        return int(value)
    return None


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: one line of `eval.jsonl`, in the one format that every writer uses and
    `choreo report` reads.

        {"task": "walker_stand", "seed": 0, "frame": 10000, "updates": 2500, "mean_return": 812.3,
         "returns": [...], "mode": "finetune", ...extra fields}
    """

    task: str
    seed: int
    frame: int
    """Environment frames of the run on its task when evaluated (0 for zero-shot planning)."""
    mean_return: float
    returns: tuple[float, ...] = ()
    """Every episode's return (files written by hand may leave them out)."""
    mode: str = DEFAULT_EVAL_MODE
    updates: int | None = None
    """Learner updates on the task when evaluated (None: a line that does not say)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields of the writer's own beyond these (e.g. `normalised_distance` of `choreo plan`)."""

    KEYS = ("task", "seed", "frame", "updates", "mean_return", "returns", "mode")

    @classmethod
    def of(cls, task: str, seed: int, frame: int, updates: int, mode: str, returns: Sequence[float],
           **extra: Any) -> EvalRecord:
        """The record of an evaluation whose episodes returned `returns` (their mean is `mean_return`)."""
        import numpy as np

        values = np.asarray(returns, np.float64)
        if values.ndim != 1 or not len(values):
            raise ValueError(f"an evaluation record needs one return per episode, got {returns!r}")
        taken = sorted(set(extra) & set(cls.KEYS))
        if taken:
            raise ValueError(f"extra fields of an evaluation record may not be named {', '.join(taken)}")
        return cls(task=task, seed=int(seed), frame=int(frame), mean_return=float(values.mean()),
                   returns=tuple(float(r) for r in values), mode=mode, updates=int(updates), extra=dict(extra))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "seed": self.seed, "frame": self.frame}
        if self.updates is not None:
            out["updates"] = self.updates
        out.update({"mean_return": self.mean_return, "returns": list(self.returns), "mode": self.mode})
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def parse(cls, text: str, where: str) -> EvalRecord:
        """The record of one line, or an EvalRecordError that starts with `where` (file:line) and
        says what is wrong."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalRecordError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise EvalRecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("task", "seed", "frame", "mean_return") if k not in obj]
        if missing:
            raise EvalRecordError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        task, mode = obj["task"], obj.get("mode", DEFAULT_EVAL_MODE)
        if not isinstance(task, str) or not task:
            raise EvalRecordError(f"{where}: task must be a non-empty string, got {task!r}")
        if mode not in EVAL_MODES:
            raise EvalRecordError(f"{where}: mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
        seed, frame = _integer(obj["seed"]), _integer(obj["frame"])
        if seed is None:
            raise EvalRecordError(f"{where}: seed must be an integer, got {obj['seed']!r}")
        if frame is None or frame < 0:
            raise EvalRecordError(f"{where}: frame must be a non-negative integer, got {obj['frame']!r}")
        updates = obj.get("updates")
        if updates is not None and (_integer(updates) is None or updates < 0):
            raise EvalRecordError(f"{where}: updates must be a non-negative integer, got {updates!r}")
        if not _finite(obj["mean_return"]):
            raise EvalRecordError(f"{where}: mean_return must be a finite number, got {obj['mean_return']!r}")
        returns = obj.get("returns", [])
        if not isinstance(returns, list) or not all(_finite(r) for r in returns):
            raise EvalRecordError(f"{where}: returns must be a list of finite numbers, got {returns!r}"[:300])
        return cls(task=task, seed=seed, frame=frame, mean_return=float(obj["mean_return"]),
                   returns=tuple(float(r) for r in returns), mode=mode,
                   updates=None if updates is None else int(updates),
                   extra={k: v for k, v in obj.items() if k not in cls.KEYS})


def read_eval_records(path: str | os.PathLike) -> list[tuple[int, EvalRecord]]:
    """(line number, record) of every evaluation in the file at `path`; blank lines are skipped
    (and counted). Raises EvalRecordError naming the file (and line) for a file that cannot be
    read and for a line that is not a record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalRecordError(f"{path}: cannot read ({e})") from None
    return [(number, EvalRecord.parse(line, f"{path}:{number}"))
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it, synced, that then replaces `path`:
    a reader sees the old file or the new one, never a part of one."""
    path = Path(path)
    write_atomically(path, text.encode("utf-8"))
    return path


def _listing(names: list[str], run_dir: Path, limit: int = 8) -> str:
    shown = [n + ("/" if (run_dir / n).is_dir() else "") for n in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def default_run_name(config: Config) -> str:
    """<task>-<algo>-<time>, with every character outside [A-Za-z0-9._-] of the task as '_'
    (a gym id such as gym:ale_py:ALE/Pong-v5 holds ':' and '/')."""
    task = re.sub(r"[^A-Za-z0-9._-]+", "_", config.env.task).strip("._") or "run"
    return f"{task}-{config.algo}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """A run directory: every file's path, creation (`create`), the checks before a resume
    (`resume`) or a read (`open`), the config, evaluation records and results.

    `RunDir(path)` checks nothing and creates nothing: it names the files of the directory at `path`."""

    CONFIG = RUN_CONFIG
    CHECKPOINT = CHECKPOINT
    SNAPSHOTS = SNAPSHOTS
    REPLAY = "replay"
    TENSORBOARD = "tensorboard"
    PLACEMENT = "placement.json"
    DRIVER_LOG = "driver.log"
    RAY_LOG = "ray.log"
    EVAL = "eval.jsonl"

    RUN_FILES = (CONFIG, CHECKPOINT, REPLAY, SNAPSHOTS, TENSORBOARD, PLACEMENT)
    """What a run writes into its directory; any of them marks the directory as taken."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ------------------------------------------------------------------ layout

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def snapshots(self) -> Path:
        return self.path / self.SNAPSHOTS

    @property
    def replay(self) -> Path:
        return self.path / self.REPLAY

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def placement(self) -> Path:
        return self.path / self.PLACEMENT

    @property
    def driver_log(self) -> Path:
        return self.path / self.DRIVER_LOG

    @property
    def ray_log(self) -> Path:
        """Ray's own messages to the driver (worker deaths, task retries, the workers' output)."""
        return self.path / self.RAY_LOG

    @property
    def eval_file(self) -> Path:
        return self.path / self.EVAL

    def snapshot(self, count: int, suffix: str = "") -> Path:
        """The snapshot at `count` frames (or updates, with suffix "updates"), as the learner names it."""
        return self.snapshots / snapshot_name(count, suffix)

    def snapshot_files(self) -> list[Path]:
        """The run's snapshots, oldest written first."""
        return sorted(self.snapshots.glob(SNAPSHOT_PATTERN), key=lambda p: p.stat().st_mtime)

    def results_file(self, kind: str) -> Path:
        """<kind>.jsonl: the records of `choreo evaluate` ("zero_shot") or `choreo plan` ("plan")."""
        return self.path / f"{_result_kind(kind)}.jsonl"

    def summary_file(self, kind: str) -> Path:
        """<kind>.json: the summary of the results of `kind` (see `results_file`)."""
        return self.path / f"{_result_kind(kind)}.json"

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(cls, config: Config, logdir: str | os.PathLike | None = None, write_config: bool = True) -> RunDir:
        """Create the run directory <logdir>/<run_name> (logdir: `config.logdir` unless given) and,
        with write_config, its config.yaml (refused when another run wrote one first). Refuses
        (ConfigError, nothing created or changed) a run_name that is not one plain name, a path that
        resolves outside logdir (a symbolic link), a file in its place, and a directory that is not
        empty, so that two runs never mix and no earlier run's file is overwritten."""
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
            cls._check_unused(run_dir)
        else:
            try:
                run_dir.mkdir(parents=True)
            except FileExistsError:
                raise ConfigError(f"run directory {run_dir} was created by someone else just now; "
                                  f"choose another run_name") from None
            except OSError as e:
                raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror}") from None
        created = cls(run_dir)
        if write_config:
            created.write_config(config, exclusive=True)
        return created

    @classmethod
    def _check_unused(cls, run_dir: Path) -> None:
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} exists and is not a directory; choose another run_name")
        try:
            present = sorted(p.name for p in run_dir.iterdir())
        except OSError as e:
            raise ConfigError(f"run directory {run_dir} cannot be read: {e.strerror}") from None
        if cls.CHECKPOINT in present:
            raise ConfigError(f"run directory {run_dir} already holds a run (it has {cls.CHECKPOINT}); continue it "
                              f"with `choreo pretrain --resume {run_dir}` or choose another run_name")
        taken = [n for n in present if n in cls.RUN_FILES]
        if taken:
            raise ConfigError(
                f"run directory {run_dir} holds a run that stopped before its first checkpoint (it has "
                f"{_listing(taken, run_dir)} but no {cls.CHECKPOINT}); --resume needs {cls.CHECKPOINT}, and a new "
                f"run is not mixed into an old one: choose another run_name (or move that directory away yourself)"
            )
        if present:
            raise ConfigError(f"run directory {run_dir} is not empty (it holds {_listing(present, run_dir)}); "
                              f"a run starts only in a new or empty directory: choose another run_name")

    @classmethod
    def resume(cls, path: str | os.PathLike) -> RunDir:
        """The run directory to continue (resolved), after checking that it holds config.yaml and a
        complete checkpoint. Errors name the directory and what is missing; nothing is changed."""
        given = Path(path).expanduser()
        if not given.exists():
            raise ConfigError(f"cannot resume {given}: no such directory")
        if not given.is_dir():
            raise ConfigError(f"cannot resume {given}: it is not a directory (give the run directory, "
                              f"e.g. runs/<run>, not a file in it)")
        run_dir = cls(given.resolve())
        if not run_dir.config_file.is_file():
            raise ConfigError(f"cannot resume {run_dir}: it holds no {cls.CONFIG}, so it is not a run directory "
                              f"(choreo pretrain writes <logdir>/<run_name>/{cls.CONFIG} when a run starts)")
        if not run_dir.checkpoint.is_file():
            raise ConfigError(f"cannot resume {run_dir}: it holds no {cls.CHECKPOINT}: the run stopped before its "
                              f"first checkpoint (written every learner.checkpoint_minutes, at each snapshot and "
                              f"when a run ends), so there is nothing to continue; start a new run with another "
                              f"run_name")
        try:  # torch checkpoints are zip archives: a truncated one has no central directory
            with zipfile.ZipFile(run_dir.checkpoint) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ConfigError(f"cannot resume {run_dir}: {cls.CHECKPOINT} is damaged or not a checkpoint ({e}); "
                              f"nothing was changed") from None
        return run_dir

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """An existing run directory to read (resolved): one that holds its config.yaml."""
        run_dir = cls(Path(path).expanduser().resolve())
        if run_dir.path.is_file():
            raise ConfigError(f"{run_dir} is a file, not a run directory (give the folder that holds {cls.CONFIG})")
        if not run_dir.config_file.is_file():
            raise ConfigError(f"{run_dir} is not a run directory (it holds no {cls.CONFIG})")
        return run_dir

    # ------------------------------------------------------------------ reading and writing

    def read_config(self) -> Config:
        """The run's resolved config (ConfigError naming the file when it is missing or invalid)."""
        return from_yaml_file(self.config_file)

    def write_config(self, config: Config, exclusive: bool = False) -> Path:
        """Write config.yaml atomically. exclusive: refuse (ConfigError) when one is already there,
        e.g. written by another run started at the same moment, instead of replacing it."""
        path = self.config_file
        path.parent.mkdir(parents=True, exist_ok=True)
        text = to_yaml(config)
        if not exclusive:
            return atomic_write_text(path, text)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        try:
            try:
                os.link(tmp, path)  # atomic, and fails when path exists
            except FileExistsError:
                raise ConfigError(f"{path} already exists: another run is using {path.parent}") from None
            except OSError:  # a file system without hard links
                try:
                    with open(path, "x") as f:
                        f.write(text)
                except FileExistsError:
                    raise ConfigError(f"{path} already exists: another run is using {path.parent}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def append_eval(self, record: EvalRecord) -> None:
        """Append one evaluation to eval.jsonl, synced to disk before this returns."""
        line = record.to_json()
        EvalRecord.parse(line, f"{self.eval_file} (being written)")  # what is written, `choreo report` reads
        with open(self.eval_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_evals(self) -> list[EvalRecord]:
        """The run's evaluations in the order written ([] before the first)."""
        if not self.eval_file.is_file():
            return []
        return [record for _, record in read_eval_records(self.eval_file)]

    def write_json(self, path: Path, obj: Any) -> Path:
        """`obj` as indented JSON at `path` (one of this directory's files), atomically."""
        return atomic_write_text(path, json.dumps(obj, indent=1))

    def write_placement(self, placement: Mapping[str, Any]) -> Path:
        """placement.json: where the learner, workers and shards run, replaced atomically."""
        return self.write_json(self.placement, placement)

    def write_results(self, kind: str, records: Iterable[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
        """A command's results (`RESULTS`): <kind>.jsonl, one record per line, then <kind>.json, the
        summary; each replaced atomically."""
        atomic_write_text(self.results_file(kind), "".join(json.dumps(r) + "\n" for r in records))
        self.write_json(self.summary_file(kind), summary)


def _result_kind(kind: str) -> str:
    if kind not in RESULTS:
        raise ValueError(f"unknown kind of results {kind!r}; known: {', '.join(RESULTS)}")
    return kind


__all__ = ["EVAL_MODES", "EvalRecord", "EvalRecordError", "RunDir", "atomic_write_text", "default_run_name",
           "read_eval_records"]
