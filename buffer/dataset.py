"""Offline datasets: ExORL-style folders of per-episode `.npz` files, read into replay shards and
written from them.

One file is one episode (or, for an exported replay, one run of consecutive steps of an episode),
rows in time order, with the keys ExORL writes:
    observation  [T, D] float (states) or [T, 3, H, W] uint8 (pixels)
    action       [T, A] float; action[t] led to observation[t] (row 0, the reset, holds zeros)
    reward       [T] or [T, 1] float; reward[t] came with observation[t]
    discount     [T] or [T, 1] float; 0 after a true termination
    physics      [T, P] float, optional: the simulator state, from which pixel observations can be
                 rendered for a pixel agent (a state dataset reused from pixels)
and, when a choreo replay was exported, the step flags and stamps of the batch layout
(is_first, is_last, is_terminal, skill, policy_version), so that an export loads back bit for bit.
Without them, an ExORL episode starts at row 0 (is_first), ends at its last row (is_last) and
terminates where its discount is 0.

Safety. Files are read with `allow_pickle=False`: an `.npz` may hold pickled Python objects, and
loading a dataset must never run code. A file that cannot be used (not an archive, truncated,
pickled objects, missing keys, wrong shapes or dtypes, non-finite values, an action size the task
does not take) is reported by name with its problem and skipped; the good ones still load.

Checksums. `write_manifest` records each file's SHA-256 and step count in `manifest.json`; when a
folder has one, loading verifies every file against it (while reading it, so no second pass) and
reports by name the files that changed, are missing, or are not listed.

This module knows no algorithm and needs numpy only; rendering from physics states is a function
the caller passes (`render`), made by the environment side.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from choreo import vocabulary as B
from choreo.vocabulary import write_atomically

EPISODE_SUFFIX = ".npz"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "choreo-dataset"
MANIFEST_VERSION = 1
PHYSICS = "physics"
STREAM_BASE = 1 << 40
"""Replay stream ids of dataset episodes start here, far above the environment workers' (which are
dense from 0), so that a dataset episode never continues a worker's stream or another episode."""

_FLAGS = (B.IS_FIRST, B.IS_LAST, B.IS_TERMINAL)
Render = Callable[[np.ndarray], np.ndarray]
"""Physics states [T, P] -> pixel observations [T, 3, H, W] uint8."""


class DatasetError(ValueError):
    """A dataset that cannot be used at all (no folder, no episode, every file bad, a broken
    manifest); the message names the folder or file."""


class EpisodeError(ValueError):
    """One episode file that cannot be used; the message names the file and its problem."""


@dataclass(frozen=True)
class EpisodeSpec:
    """What the run's replay takes: the observation shape (states [D] or pixels [3, H, W]) and the
    action size."""

    obs_shape: tuple[int, ...]
    action_dim: int
    task: str = ""
    """For messages: the task whose action size is expected."""

    @property
    def pixels(self) -> bool:
        return len(self.obs_shape) == 3

    def to_dict(self) -> dict[str, Any]:
        return {"obs_shape": list(self.obs_shape), "action_dim": self.action_dim, "task": self.task}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpisodeSpec:
        return cls(tuple(int(x) for x in d["obs_shape"]), int(d["action_dim"]), str(d.get("task", "")))


@dataclass
class LoadSummary:
    """What one load did: episodes and steps added, and the files skipped with why."""

    files: int = 0
    episodes: int = 0
    steps: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, problem) of each file that was not loaded."""
    warnings: list[str] = field(default_factory=list)
    """Problems that did not stop a file from loading (e.g. not listed in the manifest)."""
    seconds: float = 0.0

    def merge(self, other: LoadSummary | Mapping[str, Any]) -> LoadSummary:
        if isinstance(other, Mapping):
            other = LoadSummary(other["files"], other["episodes"], other["steps"],
                                [tuple(s) for s in other["skipped"]], list(other["warnings"]), other["seconds"])
        self.files += other.files
        self.episodes += other.episodes
        self.steps += other.steps
        self.skipped.extend(other.skipped)
        self.warnings.extend(other.warnings)
        self.seconds = max(self.seconds, other.seconds)  # parts load in parallel
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "episodes": self.episodes, "steps": self.steps,
                "skipped": [list(s) for s in self.skipped], "warnings": list(self.warnings), "seconds": self.seconds}

    def line(self, directory: str | os.PathLike) -> str:
        """The summary line: what was loaded from where, and how many files were skipped."""
        rate = f", {self.steps / self.seconds:,.0f} steps/s" if self.seconds > 0 else ""
        return (f"dataset {directory}: loaded {self.episodes:,} episodes, {self.steps:,} steps "
                f"in {self.seconds:.1f} s{rate}; {len(self.skipped)} file{'s' if len(self.skipped) != 1 else ''} "
                f"skipped")


# ----------------------------------------------------------------------------- reading


def episode_files(directory: str | os.PathLike) -> list[Path]:
    """The `.npz` files under `directory` (searched recursively: ExORL keeps them in
    `<domain>/<method>/buffer/`), sorted by their path relative to it."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder (expected a folder of per-episode .npz files)")
    files = sorted((p for p in root.rglob("*" + EPISODE_SUFFIX) if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DatasetError(f"dataset folder {root} holds no episodes (no {EPISODE_SUFFIX} files)")
    return files


def split_files(files: list[Path], parts: int) -> list[list[Path]]:
    """Part i of `parts` (one per replay shard): every parts-th file from the i-th, so that each
    shard gets a spread of the dataset and about as many steps."""
    return [files[i::parts] for i in range(parts)]


def _npz_arrays(path: Path, raw: bytes, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays `wanted` (those present) of an `.npz` held in `raw`, never unpickling anything."""
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:  # a plain pickle file, or a .npy holding objects
        if "pickle" in str(e):
            raise EpisodeError(f"{path}: holds pickled Python objects; refused (loading a dataset must never "
                               f"run code)") from None
        raise EpisodeError(f"{path}: not a readable .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise EpisodeError(f"{path}: not a readable .npz file (truncated or damaged: {e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise EpisodeError(f"{path}: a single .npy array, not an .npz archive of named arrays")
    out = {}
    with archive:
        for key in wanted:
            if key not in archive.files:
                continue
            try:
                out[key] = archive[key]
            except ValueError as e:
                if "pickle" in str(e) or "Object arrays" in str(e):
                    raise EpisodeError(f"{path}: key {key!r} holds pickled Python objects; refused (loading a "
                                       f"dataset must never run code)") from None
                raise EpisodeError(f"{path}: key {key!r} cannot be read ({e})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise EpisodeError(f"{path}: key {key!r} is truncated or damaged ({e})") from None
        files = set(archive.files)
    out["__keys__"] = np.array(sorted(files))  # for messages
    return out


def _float_rows(path: Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """reward / discount: [T] or [T, 1] float -> float32 [T]."""
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.dtype.kind != "f":
        raise EpisodeError(f"{path}: key {key!r} is {a.dtype} {list(a.shape)}, expected a float [{n}] or [{n}, 1]")
    return a.astype(np.float32, copy=False)


def read_episode(path: str | os.PathLike, spec: EpisodeSpec, render: Render | None = None,
                 raw: bytes | None = None) -> dict[str, np.ndarray]:
    """One episode file as a replay chunk `{key: [T, ...]}` in the batch layout's dtypes (states
    float32, pixels uint8, action/reward/discount float32, flags bool, skill int32, policy_version
    int64). Raises EpisodeError naming the file and the problem."""
    path = Path(path)
    if raw is None:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise EpisodeError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not raw:
        raise EpisodeError(f"{path}: empty file")
    wanted = (B.OBSERVATION, PHYSICS, B.ACTION, B.REWARD, B.DISCOUNT, *_FLAGS, B.SKILL, B.POLICY_VERSION)
    arrays = _npz_arrays(path, raw, wanted)
    have = set(arrays.pop("__keys__").tolist())
    # A pixel run renders its frames from the stored physics states when the file holds states.
    stored = arrays.get(B.OBSERVATION)
    from_physics = spec.pixels and PHYSICS in arrays and (stored is None or stored.ndim != 4)
    obs_key = PHYSICS if from_physics else B.OBSERVATION
    if not from_physics:
        arrays.pop(PHYSICS, None)
    missing = [k for k in (obs_key, B.ACTION, B.REWARD, B.DISCOUNT) if k not in arrays]
    if missing:
        raise EpisodeError(f"{path}: lacks key(s) {missing}; it has {sorted(have)}")

    source = arrays[obs_key]
    n = len(source) if source.ndim else 0
    if n == 0:
        raise EpisodeError(f"{path}: has no steps")
    for key, a in arrays.items():
        if a.ndim == 0 or len(a) != n:
            raise EpisodeError(f"{path}: key {key!r} has shape {list(a.shape)}, but {obs_key!r} has {n} steps")

    action = arrays[B.ACTION]
    if action.ndim != 2 or action.dtype.kind != "f":
        raise EpisodeError(f"{path}: key 'action' is {action.dtype} {list(action.shape)}, expected a float "
                           f"[{n}, {spec.action_dim}]")
    if action.shape[1] != spec.action_dim:
        task = f"the task {spec.task}" if spec.task else "the run's task"
        raise EpisodeError(f"{path}: action has size {action.shape[1]}, but {task} takes {spec.action_dim}")
    chunk = {B.ACTION: action.astype(np.float32, copy=False),
             B.REWARD: _float_rows(path, B.REWARD, arrays[B.REWARD], n),
             B.DISCOUNT: _float_rows(path, B.DISCOUNT, arrays[B.DISCOUNT], n)}

    if from_physics:
        if source.ndim != 2 or source.dtype.kind != "f":
            raise EpisodeError(f"{path}: key 'physics' is {source.dtype} {list(source.shape)}, expected a float [{n}, P]")
        if not np.isfinite(source).all():
            raise EpisodeError(f"{path}: key 'physics' holds NaN or infinite values")
        if render is None:
            raise EpisodeError(f"{path}: rendering pixels from physics states needs a renderer")
        try:
            obs = render(source)
        except ValueError as e:  # e.g. a physics state of another size than the task's
            raise EpisodeError(f"{path}: cannot render its physics states ({e})") from None
    else:
        obs = source
    if spec.pixels:
        if obs.dtype != np.uint8 or obs.shape[1:] != spec.obs_shape:
            hint = (f" (states, and no {PHYSICS!r} key to render the run's pixels from)"
                    if obs.ndim == 2 and not from_physics else "")
            what = "the frames rendered from its physics states are" if from_physics else "key 'observation' is"
            raise EpisodeError(f"{path}: {what} {obs.dtype} {list(obs.shape)}, expected uint8 "
                               f"[{n}, {', '.join(map(str, spec.obs_shape))}] (pixels, channels first){hint}")
    else:
        if obs.ndim != 2 or obs.dtype.kind != "f" or obs.shape[1:] != spec.obs_shape:
            hint = " (a pixel dataset for a state run?)" if obs.ndim == 4 else ""
            raise EpisodeError(f"{path}: key 'observation' is {obs.dtype} {list(obs.shape)}, expected a float "
                               f"[{n}, {spec.obs_shape[0]}]{hint}")
        obs = obs.astype(np.float32, copy=False)
    chunk[B.OBSERVATION] = obs
    for key in (B.OBSERVATION, B.ACTION, B.REWARD, B.DISCOUNT):
        if chunk[key].dtype.kind == "f" and not np.isfinite(chunk[key]).all():
            raise EpisodeError(f"{path}: key {key!r} holds NaN or infinite values")

    flags = [k for k in _FLAGS if k in arrays]
    if flags and len(flags) != len(_FLAGS):
        raise EpisodeError(f"{path}: has {flags} but not all of {list(_FLAGS)}")
    if flags:
        for key in _FLAGS:
            if arrays[key].dtype != np.bool_ or arrays[key].ndim != 1:
                raise EpisodeError(f"{path}: key {key!r} is {arrays[key].dtype} {list(arrays[key].shape)}, "
                                   f"expected bool [{n}]")
            chunk[key] = arrays[key]
    else:  # ExORL: one whole episode per file
        chunk[B.IS_FIRST] = np.zeros(n, np.bool_)
        chunk[B.IS_FIRST][0] = True
        chunk[B.IS_LAST] = np.zeros(n, np.bool_)
        chunk[B.IS_LAST][-1] = True
        chunk[B.IS_TERMINAL] = chunk[B.DISCOUNT] == 0
    for key, dtype in ((B.SKILL, np.int32), (B.POLICY_VERSION, np.int64)):
        if key in arrays:
            a = arrays[key]
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise EpisodeError(f"{path}: key {key!r} is {a.dtype} {list(a.shape)}, expected an integer [{n}]")
            chunk[key] = a.astype(dtype, copy=False)
        else:
            chunk[key] = np.full(n, -1, dtype)
    return {k: chunk[k] for k in B.KEYS}


# ----------------------------------------------------------------------------- manifests


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def write_manifest(directory: str | os.PathLike, entries: Mapping[str, Mapping[str, Any]],
                   source: str = "") -> Path:
    """`manifest.json` in `directory`: for each file (path relative to the folder) its SHA-256 and
    steps. Written to a temporary file and moved into place."""
    path = Path(directory) / MANIFEST
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source,
           "files": {name: dict(entry) for name, entry in sorted(entries.items())}}
    write_atomically(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The files of the folder's manifest (`{relative path: {"sha256", "steps"}}`), or None when it
    has none. A manifest that cannot be read is a DatasetError naming it."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError("not a choreo dataset manifest")
        files = {str(k): {"sha256": str(v["sha256"]), "steps": int(v.get("steps", -1))}
                 for k, v in doc["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"dataset manifest {path} cannot be read ({e}); move it away to load the folder "
                           f"without checksums") from None
    return files


def missing_from_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any], files: list[Path]) -> list[str]:
    """Files the manifest lists that are not in the folder (reported once, by the caller)."""
    root = Path(directory)
    present = {p.relative_to(root).as_posix() for p in files}
    return sorted(set(manifest) - present)


# ----------------------------------------------------------------------------- loading into a shard


def load_into(shard: Any, directory: str | os.PathLike, files: list[Path], spec: EpisodeSpec,
              render: Render | None = None, manifest: Mapping[str, Mapping[str, Any]] | None = None,
              first_stream: int = STREAM_BASE, progress: Callable[[LoadSummary], None] | None = None
              ) -> LoadSummary:
    """Adds the episodes of `files` (under `directory`) to `shard` (a `ReplayShard`), one stream
    per file from `first_stream` on, in order. Bad files are skipped and named in the summary;
    a file that changed since `manifest` was written is skipped; one not listed in it loads with a
    warning. Stops adding when the next episode would not fit the shard's capacity (the first
    episodes are kept, as the reference does), naming how many files were left out."""
    root = Path(directory)
    summary = LoadSummary(files=len(files))
    start = time.monotonic()
    capacity = int(shard.capacity)
    for i, path in enumerate(files):
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            summary.skipped.append((name, f"cannot be read ({e.strerror or e})"))
            continue
        if manifest is not None:
            entry = manifest.get(name)
            if entry is None:
                summary.warnings.append(f"{path}: not listed in the dataset's {MANIFEST}; loaded without a checksum")
            elif sha256(raw) != entry["sha256"]:
                summary.skipped.append((name, f"changed on disk since {MANIFEST} was written (SHA-256 differs)"))
                continue
        try:
            chunk = read_episode(path, spec, render, raw=raw)
        except EpisodeError as e:
            summary.skipped.append((name, str(e).removeprefix(f"{path}: ")))
            continue
        n = len(chunk[B.OBSERVATION])
        if n > capacity:
            summary.skipped.append((name, f"{n} steps do not fit a replay shard of {capacity} steps"))
            continue
        if summary.steps + n > capacity:
            left = len(files) - i
            summary.warnings.append(f"replay shard {getattr(shard, 'name', '')} is full ({capacity:,} steps): "
                                    f"the last {left} of its {len(files)} files were not loaded "
                                    f"(raise replay.capacity to hold them)")
            break
        shard.add(chunk, first_stream + i)
        summary.episodes += 1
        summary.steps += n
        if progress is not None:
            summary.seconds = time.monotonic() - start
            progress(summary)
    summary.seconds = time.monotonic() - start
    return summary


# ----------------------------------------------------------------------------- writing


def episode_name(index: int, steps: int) -> str:
    """ExORL's naming, `<index>_<steps>.npz` (the length after the last underscore)."""
    return f"{index:06d}_{steps}{EPISODE_SUFFIX}"


def write_episode(path: str | os.PathLike, episode: Mapping[str, np.ndarray]) -> str:
    """One episode as an uncompressed `.npz` (written to a temporary file, moved into place);
    returns its SHA-256."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in episode.items()})
    raw = buf.getvalue()
    write_atomically(path, raw)
    return sha256(raw)


def export_episodes(episodes: Iterator[Mapping[str, np.ndarray]], out: str | os.PathLike, source: str = "",
                    progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Writes `episodes` (replay runs `{key: [T, ...]}`) as per-episode `.npz` files and a manifest
    into `out` (created; it must not already hold a dataset). Returns {"episodes", "steps"}."""
    out = Path(out)
    if out.exists() and (any(out.glob("*" + EPISODE_SUFFIX)) or (out / MANIFEST).exists()):
        raise DatasetError(f"{out} already holds a dataset; export into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    steps = 0
    for i, episode in enumerate(episodes):
        n = len(episode[B.OBSERVATION])
        name = episode_name(i, n)
        entries[name] = {"sha256": write_episode(out / name, episode), "steps": n}
        steps += n
        if progress is not None:
            progress(i + 1, steps)
    write_manifest(out, entries, source)
    return {"episodes": len(entries), "steps": steps}
