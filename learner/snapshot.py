"""Frame snapshots: the agent's state at a frame count of pretraining, for fine-tuning to load.

A snapshot file holds plain containers and tensors only (it loads with `torch.load(...,
weights_only=True)`, so opening one cannot run code):

    {"format": "choreo-snapshot", "version": 1,
     "agent": <agent.state_dict()>, "config": <the run's resolved config as a plain dict>,
     "frames": int, "updates": int}

`save_snapshot` writes it atomically (a `.tmp` file, then `os.replace`): a crash leaves the old
file or none, never half of one. `load_snapshot` reads one back and raises `SnapshotError`, whose
message names the file and the problem, for a missing, truncated or foreign file; with the freshly
built agent's `state_dict()` it also checks that every tensor matches in name and shape
(`check_compatible`) and, when one does not, names the config keys that decide shapes and differ:
the run-level ones below and the agent's, which the caller passes (`shape_keys`; the algorithm
declares them, see `agents.registry.shape_keys`), so that this module knows no algorithm's config.
Loading never writes to the file.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from choreo.vocabulary import write_failed

FORMAT = "choreo-snapshot"
VERSION = 1
KEYS = ("format", "version", "agent", "config", "frames", "updates")

RUN_SHAPE_KEYS = ("algo", "env.obs", "env.image_size")
"""Run-level config keys that decide the shapes of any agent's tensors (with the environment's
observation and action sizes, which `env.task` decides: compared by domain, see `_domain`). The
agent's own keys (network sizes) come from the caller as `shape_keys`."""

SKIPPED = ("generator",)
"""Entries not compared: a random generator's state, whose size depends on the device it was saved
on (CPU or CUDA), not on the config."""


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded; the message names the file and the problem."""


# ----------------------------------------------------------------------------- writing


def plain(value: Any) -> Any:
    """A config (dataclass) or dict as nested dicts, lists, str, int, float, bool and None: the
    containers `torch.load(weights_only=True)` accepts (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"config value {value!r} of type {type(value).__name__} cannot be stored in a snapshot")


def save_snapshot(path: str | os.PathLike, agent_state: Mapping[str, Any], config: Any, frames: int,
                  updates: int) -> Path:
    """Write a snapshot atomically to `path` (parent folders created); returns the path.
    config: the run's resolved `launch.runtime.config.Config`, or `launch.runtime.config.to_dict` of it."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "agent": agent_state,
        "config": plain(config),
        "frames": int(frames),
        "updates": int(updates),
    }
    return atomic_torch_save(payload, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to a `.tmp` file, then `os.replace`: a crash leaves the previous file whole. A
    failed write raises `WriteFailed` naming the file and why (a full disk, the file-size limit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a short write as a RuntimeError of its own
        raise write_failed(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- reading


def load_snapshot(path: str | os.PathLike, expected: Mapping[str, Any] | None = None,
                  config: Any = None, shape_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Read the snapshot at `path` (tensors on the CPU) and check that it is one.

    expected: the `state_dict()` of a freshly built agent; when given, `check_compatible` checks
        every tensor's name and shape against it.
    config: the current run's config (`Config` or plain dict), named in a mismatch's message where
        the keys that decide shapes differ from the saved ones.
    shape_keys: the agent's shape-deciding keys as dotted keys of the run config (e.g.
        "agent.world_model.deter"), compared after `RUN_SHAPE_KEYS`; `launch.runtime.config.snapshot_shape_keys`
        gives them for a run's algorithm.
    Raises SnapshotError naming the file for: no file, a truncated or corrupted file, a file that
    is not a choreo snapshot (missing keys, another format or version), an incompatible agent.
    """
    path = Path(path)
    if not path.exists():
        raise SnapshotError(f"snapshot {path}: no such file")
    if not path.is_file():
        raise SnapshotError(f"snapshot {path}: not a file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the end
        raise SnapshotError(f"snapshot {path}: cannot be read, the file is truncated, corrupted or not a torch "
                            f"file ({path.stat().st_size} bytes without a complete zip directory)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SnapshotError(f"snapshot {path}: not a choreo snapshot, it holds objects other than tensors and "
                            f"plain containers (not loaded: a snapshot is read without running code)") from None
    except Exception as e:  # a damaged entry inside the archive, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SnapshotError(f"snapshot {path}: cannot be read, the file is truncated, corrupted or not a "
                            f"torch file ({type(e).__name__}: {reason[:200]})") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot {path}: not a choreo snapshot (it holds a {type(data).__name__}, "
                            f"not a dict with keys {', '.join(KEYS)})")
    if data.get("format") != FORMAT:
        found = f"format {data['format']!r}" if "format" in data else f"keys {', '.join(map(str, list(data)[:8]))}"
        raise SnapshotError(f"snapshot {path}: not a choreo snapshot (no format {FORMAT!r}; found {found})")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise SnapshotError(f"snapshot {path}: not a complete choreo snapshot (missing {', '.join(missing)})")
    if data["version"] != VERSION:
        raise SnapshotError(f"snapshot {path}: format version {data['version']!r}, this choreo reads "
                            f"version {VERSION}")
    kinds = {"agent": Mapping, "config": Mapping, "frames": int, "updates": int}
    for key, kind in kinds.items():
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise SnapshotError(f"snapshot {path}: '{key}' is a {type(data[key]).__name__}, not a "
                                f"{'dict' if kind is Mapping else 'integer'}")
    if expected is not None:
        check_compatible(data, expected, path, config, shape_keys)
    return data


def check_compatible(snapshot: Mapping[str, Any], agent_state: Mapping[str, Any], path: str | os.PathLike,
                     config: Any = None, shape_keys: Sequence[str] = ()) -> None:
    """Check that `snapshot["agent"]` fits `agent_state` (a freshly built agent's `state_dict()`):
    the same tensors under the same names (nested dicts and lists walked recursively) with the same
    shapes. Raises SnapshotError naming the file, the first missing, unexpected or mismatched entry
    (with both shapes), and the config keys that decide shapes (`RUN_SHAPE_KEYS`, then `shape_keys`,
    dotted keys of the run config) where the saved config and `config` differ.

    Where the fresh agent holds an empty container (an optimizer that has not stepped yet has no
    moments), the snapshot may hold anything; random generator states are not compared (their size
    depends on the device)."""
    problem = _first_difference(snapshot["agent"], agent_state, "")
    if problem is None:
        return
    message = f"snapshot {path} does not fit this agent: {problem}"
    if config is not None:
        differing = config_differences(snapshot.get("config", {}), plain(config), shape_keys)
        if differing:
            message += "; the config keys that decide shapes differ (saved -> now): " + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, a, b in differing)
    raise SnapshotError(message)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       shape_keys: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each shape-deciding config key that differs: the
    run-level `RUN_SHAPE_KEYS`, then `shape_keys` (the agent's, as dotted keys of the run config),
    then `env.task` where its domain differs."""
    out = []
    for key in dict.fromkeys((*RUN_SHAPE_KEYS, *shape_keys)):
        a, b = _get(saved, key), _get(current, key)
        if a != b:
            out.append((key, a, b))
    task_a, task_b = _get(saved, "env.task"), _get(current, "env.task")
    if isinstance(task_a, str) and isinstance(task_b, str) and _domain(task_a) != _domain(task_b):
        out.append(("env.task", task_a, task_b))
    return out


def _domain(task: str) -> str:
    """walker_stand -> walker: the tasks of a domain share observation and action sizes."""
    if task.startswith("gym:"):
        return task
    return task.split("_", 1)[0]


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict of {len(value)} entries"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def _first_difference(saved: Any, fresh: Any, key: str) -> str | None:
    """Where `saved` does not fit `fresh`, described; None when it fits."""
    name = key or "<top level>"
    if key.rsplit("/", 1)[-1].rsplit(".", 1)[-1] in SKIPPED:
        return None
    if isinstance(fresh, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"'{name}' should be a tensor of shape {tuple(fresh.shape)}, the snapshot holds {_describe(saved)}"
        if saved.shape != fresh.shape:
            return (f"'{name}' has shape {tuple(saved.shape)} in the snapshot and {tuple(fresh.shape)} "
                    f"in this agent")
        return None
    if isinstance(fresh, Mapping):
        if not isinstance(saved, Mapping):
            return f"'{name}' should be {_describe(fresh)}, the snapshot holds {_describe(saved)}"
        if not fresh:
            return None  # filled as training goes (optimizer moments): nothing to compare with
        for k in fresh:
            if k not in saved:
                return f"'{_join(key, k)}' is missing from the snapshot"
        for k in saved:
            if k not in fresh:
                return f"'{_join(key, k)}' is in the snapshot but not in this agent (unexpected)"
        for k in fresh:
            problem = _first_difference(saved[k], fresh[k], _join(key, k))
            if problem:
                return problem
        return None
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            return f"'{name}' should be {_describe(fresh)}, the snapshot holds {_describe(saved)}"
        if len(saved) != len(fresh):
            return f"'{name}' has {len(saved)} entries in the snapshot and {len(fresh)} in this agent"
        for i, (a, b) in enumerate(zip(saved, fresh)):
            problem = _first_difference(a, b, _join(key, i))
            if problem:
                return problem
        return None
    return None  # plain values (learning rates, step counts) need not match


def _join(key: str, part: Any) -> str:
    """Module keys use '.', so the entries inside a nested value (extra state, optimizers) get '/'."""
    return f"{key}/{part}" if key else str(part)
