"""Offline datasets, read into replay shards and written from them: ExORL-style folders of
per-episode `.npz` files, and Minari datasets installed locally (`minari:<dataset id>`).

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

Minari. A location `minari:<dataset id>` names a dataset in Minari's local datasets folder
(`MINARI_DATASETS_PATH`, else `~/.minari/datasets`); nothing is ever downloaded. A Minari episode
holds observations [T + 1, ...] and actions, rewards, terminations, truncations [T, ...]: row 0 of
choreo's layout is the reset observation, and row t + 1 the step that action t led to. An export
(`export_minari`) keeps in `infos`, one row per observation, what Minari's arrays do not say
(discount, is_first, is_last, is_terminal, skill, policy_version, and any further per-step key of
the replay), and in `first_action` and `first_reward` ([1, ...]) the action that led to
observations[0] and its reward (zeros after a reset; a run whose start the replay had evicted keeps
them), so that loading the export gives back the same steps bit for bit. Other Minari datasets load
as ExORL files do: row 0 gets a zero action and reward, and the episode ends at its last step,
terminated when Minari says so. Episodes whose observations are not one array (dict or tuple
spaces), and datasets whose metadata lacks the spaces (Minari would build the environment their
env_spec names to find them, which runs code), are refused. The `minari` package is optional and
imported only when a Minari dataset is used.

This module knows no algorithm and needs numpy only (Minari datasets: the optional `minari`);
rendering from physics states is a function the caller passes (`render`), made by the environment
side.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from choreo import vocabulary as B
from choreo.vocabulary import write_atomically, write_failed

EPISODE_SUFFIX = ".npz"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "choreo-dataset"
MANIFEST_VERSION = 1
PHYSICS = "physics"
STREAM_BASE = 1 << 40
"""Replay stream ids of dataset episodes start here, far above the environment workers' (which are
dense from 0), so that a dataset episode never continues a worker's stream or another episode."""

MINARI_PREFIX = "minari:"
MINARI_INSTALL = "pip install 'choreo[minari]'"
FIRST_ACTION = "first_action"
FIRST_REWARD = "first_reward"

_FLAGS = (B.IS_FIRST, B.IS_LAST, B.IS_TERMINAL)

_EPISODE_KEYS = (B.OBSERVATION, PHYSICS, B.ACTION, B.REWARD, B.DISCOUNT, *_FLAGS, B.SKILL, B.POLICY_VERSION)
"""The keys of an episode file that loading reads (any other is never read)."""

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
    """What one load did: episodes and steps added, and the files (of a Minari dataset: episodes)
    skipped with why."""

    files: int = 0
    episodes: int = 0
    steps: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, problem) of each file that was not loaded."""
    warnings: list[str] = field(default_factory=list)
    """Problems that did not stop a file from loading (e.g. not listed in the manifest)."""
    seconds: float = 0.0
    unit: str = "file"
    """What the dataset is made of, for messages: "file" (a folder) or "episode" (Minari)."""

    def merge(self, other: LoadSummary | Mapping[str, Any]) -> LoadSummary:
        if isinstance(other, Mapping):
            other = LoadSummary(other["files"], other["episodes"], other["steps"],
                                [tuple(s) for s in other["skipped"]], list(other["warnings"]), other["seconds"],
                                other.get("unit", "file"))
        self.files += other.files
        self.episodes += other.episodes
        self.steps += other.steps
        self.skipped.extend(other.skipped)
        self.warnings.extend(other.warnings)
        self.seconds = max(self.seconds, other.seconds)  # parts load in parallel
        self.unit = other.unit
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "episodes": self.episodes, "steps": self.steps,
                "skipped": [list(s) for s in self.skipped], "warnings": list(self.warnings), "seconds": self.seconds,
                "unit": self.unit}

    def count(self, n: int) -> str:
        """`n` of the dataset's unit, e.g. "1 file", "3 episodes"."""
        return f"{n:,} {self.unit}{'s' if n != 1 else ''}"

    def line(self, directory: str | os.PathLike) -> str:
        """The summary line: what was loaded from where, and how many files were skipped."""
        rate = f", {self.steps / self.seconds:,.0f} steps/s" if self.seconds > 0 else ""
        return (f"dataset {directory}: loaded {self.episodes:,} episodes, {self.steps:,} steps "
                f"in {self.seconds:.1f} s{rate}; {self.count(len(self.skipped))} skipped")


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


def split_episodes(episodes: Sequence[Any], parts: int) -> list[list[Any]]:
    """Part i of `parts` (one per replay shard): every parts-th episode (file, or Minari episode
    index) from the i-th, so that each shard gets a spread of the dataset and about as many steps."""
    return [list(episodes[i::parts]) for i in range(parts)]


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


def _float_rows(where: str, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """reward / discount: [T] or [T, 1] float -> float32 [T]."""
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.dtype.kind != "f":
        raise EpisodeError(f"{where}: key {key!r} is {a.dtype} {list(a.shape)}, expected a float [{n}] or [{n}, 1]")
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
    arrays = _npz_arrays(path, raw, _EPISODE_KEYS)
    have = set(arrays.pop("__keys__").tolist())
    return episode_chunk(str(path), arrays, have, spec, render)


def episode_chunk(where: str, arrays: dict[str, np.ndarray], have: Iterable[str], spec: EpisodeSpec,
                  render: Render | None = None) -> dict[str, np.ndarray]:
    """What every source shares: an episode's arrays, under the keys of an episode file (those of
    `_EPISODE_KEYS` it has, rows in time order), checked and made a replay chunk as `read_episode`
    describes. `have` lists every key the episode has and `where` names it, for messages; raises
    EpisodeError naming `where` and the problem."""
    # A pixel run renders its frames from the stored physics states when the file holds states.
    stored = arrays.get(B.OBSERVATION)
    from_physics = spec.pixels and PHYSICS in arrays and (stored is None or stored.ndim != 4)
    obs_key = PHYSICS if from_physics else B.OBSERVATION
    if not from_physics:
        arrays.pop(PHYSICS, None)
    missing = [k for k in (obs_key, B.ACTION, B.REWARD, B.DISCOUNT) if k not in arrays]
    if missing:
        raise EpisodeError(f"{where}: lacks key(s) {missing}; it has {sorted(have)}")

    source = arrays[obs_key]
    n = len(source) if source.ndim else 0
    if n == 0:
        raise EpisodeError(f"{where}: has no steps")
    for key, a in arrays.items():
        if a.ndim == 0 or len(a) != n:
            raise EpisodeError(f"{where}: key {key!r} has shape {list(a.shape)}, but {obs_key!r} has {n} steps")

    action = arrays[B.ACTION]
    if action.ndim != 2 or action.dtype.kind != "f":
        raise EpisodeError(f"{where}: key 'action' is {action.dtype} {list(action.shape)}, expected a float "
                           f"[{n}, {spec.action_dim}]")
    if action.shape[1] != spec.action_dim:
        task = f"the task {spec.task}" if spec.task else "the run's task"
        raise EpisodeError(f"{where}: action has size {action.shape[1]}, but {task} takes {spec.action_dim}")
    chunk = {B.ACTION: action.astype(np.float32, copy=False),
             B.REWARD: _float_rows(where, B.REWARD, arrays[B.REWARD], n),
             B.DISCOUNT: _float_rows(where, B.DISCOUNT, arrays[B.DISCOUNT], n)}

    if from_physics:
        if source.ndim != 2 or source.dtype.kind != "f":
            raise EpisodeError(f"{where}: key 'physics' is {source.dtype} {list(source.shape)}, expected a float "
                               f"[{n}, P]")
        if not np.isfinite(source).all():
            raise EpisodeError(f"{where}: key 'physics' holds NaN or infinite values")
        if render is None:
            raise EpisodeError(f"{where}: rendering pixels from physics states needs a renderer")
        try:
            obs = render(source)
        except ValueError as e:  # e.g. a physics state of another size than the task's
            raise EpisodeError(f"{where}: cannot render its physics states ({e})") from None
    else:
        obs = source
    if spec.pixels:
        if obs.dtype != np.uint8 or obs.shape[1:] != spec.obs_shape:
            hint = (f" (states, and no {PHYSICS!r} key to render the run's pixels from)"
                    if obs.ndim == 2 and not from_physics else "")
            what = "the frames rendered from its physics states are" if from_physics else "key 'observation' is"
            raise EpisodeError(f"{where}: {what} {obs.dtype} {list(obs.shape)}, expected uint8 "
                               f"[{n}, {', '.join(map(str, spec.obs_shape))}] (pixels, channels first){hint}")
    else:
        if obs.ndim != 2 or obs.dtype.kind != "f" or obs.shape[1:] != spec.obs_shape:
            hint = " (a pixel dataset for a state run?)" if obs.ndim == 4 else ""
            raise EpisodeError(f"{where}: key 'observation' is {obs.dtype} {list(obs.shape)}, expected a float "
                               f"[{n}, {spec.obs_shape[0]}]{hint}")
        obs = obs.astype(np.float32, copy=False)
    chunk[B.OBSERVATION] = obs
    for key in (B.OBSERVATION, B.ACTION, B.REWARD, B.DISCOUNT):
        if chunk[key].dtype.kind == "f" and not np.isfinite(chunk[key]).all():
            raise EpisodeError(f"{where}: key {key!r} holds NaN or infinite values")

    flags = [k for k in _FLAGS if k in arrays]
    if flags and len(flags) != len(_FLAGS):
        raise EpisodeError(f"{where}: has {flags} but not all of {list(_FLAGS)}")
    if flags:
        for key in _FLAGS:
            if arrays[key].dtype != np.bool_ or arrays[key].ndim != 1:
                raise EpisodeError(f"{where}: key {key!r} is {arrays[key].dtype} {list(arrays[key].shape)}, "
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
                raise EpisodeError(f"{where}: key {key!r} is {a.dtype} {list(a.shape)}, expected an integer [{n}]")
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


# ----------------------------------------------------------------------------- sources


class NpzFolder:
    """A folder of per-episode `.npz` files (ExORL's layout, or `choreo export`'s), checked against
    its manifest when it has one and `verify` is on."""

    unit = "file"

    def __init__(self, directory: str | os.PathLike, verify: bool = True) -> None:
        self.root = Path(directory).expanduser()
        self.files = episode_files(self.root)
        self.manifest = read_manifest(self.root) if verify else None

    def episodes(self) -> list[Path]:
        return self.files

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def label(self, name: str) -> str:
        return episode_label(self.root, name)

    def warnings(self) -> list[str]:
        """Files the manifest lists that the folder lacks (said once, before loading)."""
        missing = missing_from_manifest(self.root, self.manifest, self.files) if self.manifest else []
        return [f"{self.root / name}: listed in the dataset's {MANIFEST} but missing" for name in missing]

    def read(self, path: Path, spec: EpisodeSpec, render: Render | None = None
             ) -> tuple[dict[str, np.ndarray], list[str]]:
        """(the file as a replay chunk, warnings); a file that changed since the manifest was
        written is an EpisodeError, one the manifest does not list a warning."""
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise EpisodeError(f"{path}: cannot be read ({e.strerror or e})") from None
        notes = []
        if self.manifest is not None:
            entry = self.manifest.get(self.name(path))
            if entry is None:
                notes.append(f"{path}: not listed in the dataset's {MANIFEST}; loaded without a checksum")
            elif sha256(raw) != entry["sha256"]:
                raise EpisodeError(f"{path}: changed on disk since {MANIFEST} was written (SHA-256 differs)")
        return read_episode(path, spec, render, raw=raw), notes


def import_minari() -> Any:
    """The optional `minari` package, or a DatasetError that says how to install it."""
    try:
        import minari
    except ImportError:
        raise DatasetError(f"Minari datasets need the minari package, which is not installed: "
                           f"{MINARI_INSTALL}") from None
    return minari


def check_minari_id(dataset_id: str) -> None:
    """A DatasetError unless `dataset_id` has Minari's form, `[namespace/]name-v<version>`."""
    import_minari()
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # TypeError: no version
        raise DatasetError(f"{dataset_id!r} is not a Minari dataset id: ids have the form "
                           f"[namespace/]name-v<version>, e.g. choreo/walker-v0") from None


def minari_path(dataset_id: str) -> Path:
    """Where Minari keeps the local dataset `dataset_id`: `MINARI_DATASETS_PATH`, else
    `~/.minari/datasets`, then the id."""
    import_minari()
    from minari.storage import get_dataset_path

    return Path(get_dataset_path(dataset_id))


def new_minari_path(dataset_id: str) -> Path:
    """Where a new local Minari dataset `dataset_id` goes; a DatasetError when the id is not one or
    is taken."""
    check_minari_id(dataset_id)
    path = minari_path(dataset_id)
    if path.exists():
        raise DatasetError(f"Minari dataset {dataset_id} already exists at {path}; choose another id (e.g. the next "
                           f"version) or delete it first (minari delete {dataset_id})")
    return path


class MinariSource:
    """A Minari dataset installed locally, named `minari:<dataset id>`: opened from Minari's local
    datasets folder, never downloaded."""

    unit = "episode"

    def __init__(self, location: str) -> None:
        self.location = location
        self.dataset_id = location.removeprefix(MINARI_PREFIX)
        minari = import_minari()
        from minari.dataset.minari_storage import MinariStorage

        check_minari_id(self.dataset_id)
        path = minari_path(self.dataset_id)
        data = path / "data"
        if not data.is_dir():
            raise DatasetError(f"Minari dataset {self.dataset_id} is not installed locally: {path} does not exist "
                               f"(Minari's local datasets folder is {minari_path('')}: MINARI_DATASETS_PATH, else "
                               f"~/.minari/datasets); nothing is downloaded: fetch it first with `minari download "
                               f"{self.dataset_id}`, or see what is there with `minari list local`")
        try:
            metadata = MinariStorage.read_raw_metadata(data)
        except (ValueError, OSError) as e:
            raise DatasetError(f"Minari dataset {self.dataset_id} at {path}: its metadata cannot be read "
                               f"({e})") from None
        lacks = [key for key in ("observation_space", "action_space") if key not in metadata]
        if lacks:  # Minari would make the environment that env_spec names to find them: running code
            raise DatasetError(f"Minari dataset {self.dataset_id} at {path}: its metadata lacks {lacks}, and finding "
                               f"them would build the environment it names; refused (loading a dataset must never "
                               f"run code)")
        try:
            self.dataset = minari.MinariDataset(data)
        except (ValueError, OSError, KeyError, AssertionError) as e:
            raise DatasetError(f"Minari dataset {self.dataset_id} at {path} cannot be opened ({e})") from None
        if not len(self.dataset):
            raise DatasetError(f"Minari dataset {self.dataset_id} at {path} holds no episodes")

    def episodes(self) -> list[int]:
        return [int(i) for i in self.dataset.episode_indices]

    def name(self, index: int) -> str:
        return f"episode {index}"

    def label(self, name: str) -> str:
        return episode_label(self.location, name)

    def warnings(self) -> list[str]:
        return []

    def read(self, index: int, spec: EpisodeSpec, render: Render | None = None
             ) -> tuple[dict[str, np.ndarray], list[str]]:
        where = self.label(self.name(index))
        try:
            episode = next(iter(self.dataset.iterate_episodes([index])))
        except (ValueError, OSError, KeyError, AssertionError) as e:
            raise EpisodeError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
        arrays = minari_arrays(where, episode)
        return episode_chunk(where, arrays, arrays, spec, render), []


DatasetSource = NpzFolder | MinariSource


def is_minari(location: str | os.PathLike) -> bool:
    return str(location).startswith(MINARI_PREFIX)


def episode_label(location: str | os.PathLike, name: str) -> str:
    """How messages name episode `name` (a source's `name`) of the dataset at `location`."""
    return f"{location} {name}" if is_minari(location) else str(Path(location).expanduser() / name)


def open_dataset(location: str | os.PathLike, verify: bool = True) -> DatasetSource:
    """The dataset at `location`: `minari:<dataset id>` (a local Minari dataset) or a folder of
    `.npz` files (`verify`: check them against its manifest). A dataset that cannot be used at all
    is a DatasetError naming it."""
    if is_minari(location):
        return MinariSource(str(location))
    return NpzFolder(location, verify)


def minari_arrays(where: str, episode: Any) -> dict[str, np.ndarray]:
    """A Minari episode (`minari.EpisodeData`) under the keys of an episode file: row 0 is the
    first observation, with the action and reward an export kept in `first_action` and
    `first_reward` (else zeros); the step fields an export kept in `infos` are taken as they are,
    and the discount of another dataset is 0 after a termination, else 1."""
    observations, actions = episode.observations, episode.actions
    for what, value in (("observations", observations), ("actions", actions)):
        if not isinstance(value, np.ndarray):
            raise EpisodeError(f"{where}: its {what} are a {type(value).__name__}, not one array (choreo takes a "
                               f"Box space: states or pixels, and continuous actions)")
    n = len(observations) if observations.ndim else 0
    if n == 0:
        raise EpisodeError(f"{where}: has no steps")
    rewards = np.asarray(episode.rewards)
    terminations, truncations = np.asarray(episode.terminations), np.asarray(episode.truncations)
    for what, a in (("actions", actions), ("rewards", rewards), ("terminations", terminations),
                    ("truncations", truncations)):
        if a.ndim == 0 or len(a) != n - 1 or (what in ("terminations", "truncations") and a.ndim != 1):
            raise EpisodeError(f"{where}: has {n} observations and {what} of shape {list(a.shape)} (a Minari "
                               f"episode has one observation more than it has steps)")
    ends = np.flatnonzero(terminations[:-1].astype(bool) | truncations[:-1].astype(bool))
    if len(ends):
        raise EpisodeError(f"{where}: ends (terminated or truncated) at step {ends[0] + 1} of {n - 1}, but goes on")
    infos = episode.infos or {}

    def info(key: str) -> np.ndarray | None:
        value = infos.get(key)
        if value is not None and not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf"):
            what = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
            raise EpisodeError(f"{where}: infos key {key!r} is a {what}, not an array of numbers")
        return value

    first_action, first_reward = info(FIRST_ACTION), info(FIRST_REWARD)
    for what, first, rest in (("first_action", first_action, actions), ("first_reward", first_reward, rewards)):
        if first is not None and first.shape != (1, *rest.shape[1:]):
            raise EpisodeError(f"{where}: infos key {what!r} has shape {list(first.shape)}, expected "
                               f"{[1, *rest.shape[1:]]}")
    arrays = {
        B.OBSERVATION: observations,
        B.ACTION: np.concatenate([first_action if first_action is not None
                                  else np.zeros((1, *actions.shape[1:]), actions.dtype), actions]),
        B.REWARD: np.concatenate([first_reward if first_reward is not None
                                  else np.zeros((1, *rewards.shape[1:]), rewards.dtype), rewards]),
    }
    discount = info(B.DISCOUNT)
    arrays[B.DISCOUNT] = discount if discount is not None else \
        np.concatenate([[1.0], np.where(terminations.astype(bool), 0.0, 1.0)]).astype(np.float32)
    for key in (*_FLAGS, B.SKILL, B.POLICY_VERSION, PHYSICS):
        if (value := info(key)) is not None:
            arrays[key] = value
    return arrays


# ----------------------------------------------------------------------------- loading into a shard


def load_into(shard: Any, source: DatasetSource, episodes: Sequence[Any], spec: EpisodeSpec,
              render: Render | None = None, first_stream: int = STREAM_BASE,
              progress: Callable[[LoadSummary], None] | None = None) -> LoadSummary:
    """Adds `episodes` of `source` (files of a folder, or a Minari dataset's episode indices) to
    `shard` (a `ReplayShard`), one stream per episode from `first_stream` on, in order. Bad ones are
    skipped and named in the summary, with the problem (a file that changed since its folder's
    manifest was written among them; one not listed in it loads with a warning). Stops adding when
    the next episode would not fit the shard's capacity (the first episodes are kept, as the
    reference does), naming how many were left out."""
    summary = LoadSummary(files=len(episodes), unit=source.unit)
    start = time.monotonic()
    capacity = int(shard.capacity)
    for i, episode in enumerate(episodes):
        name = source.name(episode)
        try:
            chunk, notes = source.read(episode, spec, render)
        except EpisodeError as e:
            summary.skipped.append((name, str(e).removeprefix(f"{source.label(name)}: ")))
            continue
        summary.warnings.extend(notes)
        n = len(chunk[B.OBSERVATION])
        if n > capacity:
            summary.skipped.append((name, f"{n} steps do not fit a replay shard of {capacity} steps"))
            continue
        if summary.steps + n > capacity:
            summary.warnings.append(f"replay shard {getattr(shard, 'name', '')} is full ({capacity:,} steps): "
                                    f"the last {len(episodes) - i} of its {summary.count(len(episodes))} were not "
                                    f"loaded (raise replay.capacity to hold them)")
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


MINARI_FIELDS = ("infos hold choreo's step fields, one row per observation (discount, is_first, is_last, is_terminal, "
                 "skill, policy_version), and first_action and first_reward the action that led to observations[0] "
                 "and its reward.")
"""Said in the description of every Minari export, so that the dataset explains its infos."""


def minari_episode(run: Mapping[str, np.ndarray]) -> Any:
    """A replay run of two steps or more as a Minari `EpisodeBuffer`: its first row is the first
    observation, the others are steps; the flags, stamps and row 0's action and reward go to infos
    (module docstring)."""
    from minari.data_collector import EpisodeBuffer

    terminated = run[B.IS_TERMINAL][1:]
    truncated = run[B.IS_LAST][1:] & ~terminated
    if not run[B.IS_LAST][-1]:
        truncated[-1] = True  # the replay holds the episode up to here: for Minari, it was cut here
    infos = {key: value for key, value in run.items() if key not in (B.OBSERVATION, B.ACTION, B.REWARD)}
    infos[FIRST_ACTION] = run[B.ACTION][:1]
    infos[FIRST_REWARD] = run[B.REWARD][:1]
    return EpisodeBuffer(observations=run[B.OBSERVATION], actions=run[B.ACTION][1:], rewards=run[B.REWARD][1:],
                         terminations=terminated, truncations=truncated, infos=infos)


def export_minari(episodes: Iterable[Mapping[str, np.ndarray]], dataset_id: str, description: str = "",
                  algorithm: str = "", progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Writes `episodes` (replay runs `{key: [T, ...]}`) as the local Minari dataset `dataset_id`
    (in Minari's datasets folder, `minari_path`), every array as it is (pixels too: no JPEG), with
    choreo's step fields in infos. A run of one step holds no transition, which a Minari episode
    needs: it is left out and counted. Returns {"episodes", "steps", "left_out", "path"}; an export
    that fails leaves no dataset behind."""
    minari = import_minari()
    import gymnasium

    path = new_minari_path(dataset_id)
    runs = iter(episodes)
    first = next(runs, None)
    if first is None:
        raise DatasetError("the replay holds no steps: nothing to export")
    obs, action = first[B.OBSERVATION], first[B.ACTION]
    pixels = obs.dtype == np.uint8
    observation_space = gymnasium.spaces.Box(0 if pixels else -np.inf, 255 if pixels else np.inf, obs.shape[1:],
                                             obs.dtype)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, action.shape[1:], action.dtype)
    counts = {"episodes": 0, "steps": 0, "left_out": 0}

    def buffers() -> Iterator[Any]:
        for run in itertools.chain([first], runs):
            n = len(run[B.OBSERVATION])
            if n < 2:
                counts["left_out"] += 1
                continue
            counts["episodes"] += 1
            counts["steps"] += n
            yield minari_episode(run)
            if progress is not None:
                progress(counts["episodes"], counts["steps"])

    try:
        with warnings.catch_warnings():  # Minari asks for an author, a code link, ...: optional
            warnings.filterwarnings("ignore", message=r".*(is set to None|env_spec is None)")
            minari.create_dataset_from_buffers(dataset_id, buffers(), observation_space=observation_space,
                                               action_space=action_space, algorithm_name=algorithm or None,
                                               description=f"{description} {MINARI_FIELDS}".strip(),
                                               jpeg_encoding=False)
        if not counts["episodes"]:
            raise DatasetError(f"every run of the replay has one step ({counts['left_out']} runs), and a Minari "
                               f"episode needs a step after its first observation: nothing exported")
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failed(path, e) from None
        raise
    return {**counts, "path": str(path)}
