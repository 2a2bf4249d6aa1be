"""The run configuration: typed, composed from YAML presets, validated before anything starts.

Composition order (later wins):
    configs/base.yaml -> configs/suite/<suite>.yaml -> configs/size/<size>.yaml
    -> configs/algo/<algo>.yaml -> configs/mode/<mode>.yaml -> the presets' `when` rules
    -> the `--config FILE` -> key=value overrides from the command line.
A preset may hold `when:`, a list of rules `{<group>: <name>, ..., set: {<keys>}}`; once every group
is chosen, the rules of every preset (in the group order above) whose groups all match are applied.
That is how a size bounds every mode (tiny.yaml: `{mode: finetune, set: {learner: {total_frames:
2000}}}` comes after the fine-tuning protocol's 100k frames) and how an algorithm adapts a size.
The suite and size presets state Choreographer's protocol (the reference's sizes, one update every
10 frames on 50x50 batches); an algorithm with a protocol of its own (DADS: 256 pairs per batch, a
small replay, its own ratio) states it in its preset, which comes after them.

`--preset NAME` picks the preset NAME from whichever group has it, so `--preset pixels --preset
tiny` and `--preset tiny --preset pixels` mean the same. The group choices are themselves keys
(`algo`, `suite`, `size`, `mode`) and may also be given as overrides (`algo=dads`). The mode is
what a command does (`choreo pretrain`: pretrain, `choreo finetune`: finetune); its preset holds
that protocol's defaults (for fine-tuning: 100k frames, no random warm-up, evaluations).

`--config FILE` (every command that takes overrides) is a YAML mapping of keys, nested as in the
presets (`learner: {total_frames: 1e6}`), or a run's saved config.yaml (a full resolved config, so
it fixes every key; `key=value` still changes any). Its group keys (`size: tiny`) choose presets as
`--preset` does and win over `--preset`; `key=value` wins over both (`size=small`). A file of
another mode (a pretraining run's config.yaml given to `choreo finetune`) is put into the command's
mode the way a snapshot's config is (`in_mode`): that mode's preset and the presets' rules about it
come after the file, then the overrides. The commands that start from a snapshot's config
(`choreo plan`, `choreo visualize`) compose: the snapshot's config -> the command's mode -> the
file -> key=value. `when` rules belong in presets, not in a config file. Errors name the file and
the key.

`task=` is short for `env.task=`, in overrides (every command, and `load_snapshot`) and in config
files (`task: walker_run`) alike (ALIASES).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from choreo.actors.config import EnvConfig
from choreo.agents import registry
from choreo.agents.config import AgentConfig
from choreo.buffer.config import DatasetConfig, ReplayConfig
from choreo.learner.config import LearnerConfig

CONFIG_DIR = Path(os.environ.get("CHOREO_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs"))
GROUPS = ("suite", "size", "algo", "mode")
"""Preset groups, in composition order after base."""
WHEN = "when"
"""A preset's list of rules applied once every group is chosen (see the module's docstring)."""
RUN_CONFIG = "config.yaml"
"""The file in a run directory that holds the run's resolved config (`RunDir.CONFIG`)."""


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the key or file at fault."""


@dataclass(frozen=True)
class EvalConfig:
    every_frames: int = 0
    """Frames between evaluations, the first at frame 0 (0: no evaluations)."""
    every_updates: int = 0
    """Offline-only runs (no environment workers, so no frames): updates between evaluations,
    the first at update 0 (0: no evaluations)."""
    episodes: int = 10
    """Episodes of one evaluation, on environments seeded apart from the training ones, acting
    with the policy's mean action."""


@dataclass(frozen=True)
class MonitorConfig:
    media_every: int = 10000
    """Learner updates between TensorBoard pictures (decoded skill codes, codebook plot, code
    usage histogram; see launch/commands/visualize.py `learner_media`); 0: none."""


@dataclass(frozen=True)
class Config:
    algo: Literal["choreographer", "dads"] = "choreographer"
    """Algorithm; selects configs/algo/<algo>.yaml."""
    suite: Literal["states", "pixels", "metaworld"] = "states"
    """Observation suite; selects configs/suite/<suite>.yaml."""
    size: Literal["paper", "small", "tiny"] = "paper"
    """Model and run size; selects configs/size/<size>.yaml."""
    mode: Literal["pretrain", "finetune", "evaluate", "plan"] = "pretrain"
    """What the run does (set by the command); selects configs/mode/<mode>.yaml."""
    snapshot: str = ""
    """Pretraining snapshot the run starts from (`choreo finetune` / `choreo evaluate --snapshot`)."""
    from_scratch: bool = False
    """Fine-tune from random weights instead of a snapshot, with the same protocol (--from-scratch)."""
    seed: int = 0
    """Root seed; every actor, environment and shard seed is derived from it."""
    logdir: str = "runs"
    """Folder that holds the run directories."""
    run_name: str = ""
    """Name of the run directory under logdir (empty: <task>-<algo>-<timestamp>)."""
    num_actors: int = 2
    """Environment workers (Ray actors)."""
    envs_per_actor: int = 1
    """Environments stepped by each worker with one batched policy call."""
    num_shards: int = 1
    """Replay shards (Ray actors)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """The algorithm's networks and losses."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """The sharded replay service."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The learner process."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluations during the run."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Offline data loaded into replay (offline or mixed pretraining)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """What the run writes to TensorBoard besides scalars."""


# ----------------------------------------------------------------------------- field docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, type, doc) for every leaf field under cls."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, docs.get(f.name, "")


# ----------------------------------------------------------------------------- value checking


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """value as type tp, or a ConfigError naming key. Strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(key, v, typing.get_args(tp)[0]) for v in value)
    elif tp is type(None):
        if value is None or value in ("null", "None", "none"):
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        else:
            try:
                number = float(value)  # accepts 2e6 and 2_000_000
            except (TypeError, ValueError):
                number = None
            if number is not None and number.is_integer():
                return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")


# ----------------------------------------------------------------------------- building


def _unknown_key(key: str, section_cls: type, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(section_cls)]
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys in {where}: {', '.join(names)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, cls, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. '{key}.<name>=...'")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{p}' is not a section")
        node = child
    node[leaf] = value


def load_yaml(path: Path) -> dict:
    """A preset file as a dict, with a clear error for unreadable or malformed YAML."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def available_presets() -> dict[str, list[str]]:
    """Preset names by group, from the files in CONFIG_DIR."""
    return {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in GROUPS}


ALIASES = {"task": "env.task"}
"""Short keys, the same in `key=value` overrides and `--config` files: `task=walker_run` is
`env.task=walker_run` (the key every command that picks a task takes)."""


def parse_override(text: str) -> tuple[str, str]:
    """`key=value` -> (dotted key, value as given), short keys (ALIASES) expanded."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r} is not of the form key=value (dotted keys for sections)")
    key, value = text.split("=", 1)
    key = key.strip()
    return ALIASES.get(key, key), value


# ----------------------------------------------------------------------------- --config FILE


@dataclass(frozen=True)
class ConfigFile:
    """A `--config FILE`, read and checked against the config's keys and types (`read_config_file`)."""

    path: Path
    """The file."""
    values: tuple[tuple[str, Any], ...]
    """(dotted key, typed value) for every key the file sets, group keys included, in file order."""

    @property
    def groups(self) -> dict[str, str]:
        """The presets the file chooses, by group (`size: tiny`)."""
        return {key: value for key, value in self.values if key in GROUPS}


def read_config_file(path: str | os.PathLike) -> ConfigFile:
    """A YAML file of config keys, nested as in the presets (or a run's saved config.yaml), checked:
    every key exists, every value has its key's type, every group names a preset. Errors name the
    file and the key."""
    path = Path(path).expanduser()
    if path.is_dir():
        saved = path / RUN_CONFIG
        hint = f"; its saved config is {saved}" if saved.is_file() else ""
        raise ConfigError(f"config file {path}: is a directory, not a YAML file{hint}")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = _moved_sections(load_yaml(path))  # load_yaml's errors name the file already
    if WHEN in data:
        raise ConfigError(f"config file {path}: '{WHEN}' rules belong in presets (configs/<group>/); a config "
                          f"file sets keys, after the presets and their rules")
    values: list[tuple[str, Any]] = []
    try:
        for alias, key in ALIASES.items():
            if alias in data:
                if _has_dotted(data, key):
                    raise ConfigError(f"it sets both '{alias}' and '{key}' ('{alias}' is short for '{key}')")
                _set_dotted(data, key, data.pop(alias))
        _flatten(Config, data, "", values)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return ConfigFile(path, tuple(values))


def _has_dotted(tree: dict, key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _flatten(cls: type, data: typing.Mapping, prefix: str, out: list[tuple[str, Any]]) -> None:
    """The keys of `data` (nested, of section `cls`) as (dotted key, typed value) pairs, appended to out."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, cls, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give a mapping of its keys")
            _flatten(tp, value, f"{key}.", out)
            continue
        value = _coerce(key, value, tp)
        if key in GROUPS:
            _check_preset(key, value)
        out.append((key, value))


def as_config_file(config_file: str | os.PathLike | ConfigFile | None) -> ConfigFile | None:
    """A `--config` argument (a path, or a file read already) as a ConfigFile, or None."""
    if config_file is None or isinstance(config_file, ConfigFile):
        return config_file
    return read_config_file(config_file)


def _with_file(tree: dict, file: ConfigFile | None, mode: str | None) -> dict:
    """`tree` with the file's keys set. A file of another mode than `mode` (a pretraining run's
    config.yaml given to `choreo finetune`) is then put into `mode`, as a snapshot's config is."""
    if file is None:
        return tree
    for key, value in file.values:
        _set_dotted(tree, key, value)
    stated = file.groups.get("mode")
    if mode is not None and stated is not None and stated != mode:
        tree = _into_mode(tree, mode)
    return tree


def _into_mode(tree: dict, mode: str) -> dict:
    """A resolved config's tree put into `mode`: the mode's preset, then its presets' rules about
    that mode (the other rules made it already)."""
    tree = _merge(tree, {k: v for k, v in load_yaml(CONFIG_DIR / "mode" / f"{mode}.yaml").items() if k != WHEN})
    tree["mode"] = mode
    rules = []
    for group in GROUPS:
        path = CONFIG_DIR / group / f"{tree[group]}.yaml"
        if path.is_file():
            rules += [(path, rule) for rule in _when_rules(load_yaml(path), path)]
    return _apply_rules(tree, rules, only_mode=mode)


def load_config(presets: typing.Sequence[str] = (), overrides: typing.Sequence[str] = (),
                config_file: str | os.PathLike | ConfigFile | None = None) -> Config:
    """Compose base, the group presets, their rules, the config file and the overrides (in the
    order of the module's docstring) into a validated Config."""
    by_group = available_presets()
    file = as_config_file(config_file)
    choice: dict[str, str] = {}
    for name in presets:
        groups = [g for g, names in by_group.items() if name in names]
        if not groups:
            names = [n for names in by_group.values() for n in names]
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown preset '{name}'{hint}; valid presets: {', '.join(names)}")
        choice[groups[0]] = name
    if file is not None:
        choice.update(file.groups)
    parsed = [parse_override(o) for o in overrides]
    for key, value in parsed:
        if key in GROUPS:
            _check_preset(key, value)
            choice[key] = value

    tree = load_yaml(CONFIG_DIR / "base.yaml")
    rules: list[tuple[Path, dict]] = []
    for group in GROUPS:
        name = choice.get(group, tree.get(group, getattr(Config, group)))
        if name not in by_group[group]:
            raise ConfigError(f"config key '{group}': {name!r} is not one of {', '.join(by_group[group])}")
        path = CONFIG_DIR / group / f"{name}.yaml"
        preset = load_yaml(path)
        rules += [(path, rule) for rule in _when_rules(preset, path)]
        tree = _merge(tree, preset)
        tree[group] = name
    tree = _apply_rules(tree, rules)
    tree = _with_file(tree, file, tree["mode"])
    for key, value in parsed:
        _set_dotted(tree, key, value)
    config = _build(Config, tree)
    validate(config)
    return config


def _check_preset(group: str, name: str) -> None:
    valid = available_presets()[group]
    if name not in valid:
        raise ConfigError(f"config key '{group}': {name!r} is not one of {', '.join(valid)}")


def _when_rules(preset: dict, path: Path) -> list[dict]:
    """The `when` rules of a preset (removed from it), checked: each names groups and what it sets."""
    rules = preset.pop(WHEN, None) or []
    if not isinstance(rules, list):
        raise ConfigError(f"{path}: '{WHEN}' must be a list of rules {{<group>: <name>, ..., set: {{...}}}}")
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("set"), dict) \
                or not set(rule) - {"set"} or not set(rule) - {"set"} <= set(GROUPS):
            raise ConfigError(f"{path}: each '{WHEN}' rule names groups ({', '.join(GROUPS)}) and a mapping "
                              f"'set', got {rule!r}")
    return rules


def _apply_rules(tree: dict, rules: list[tuple[Path, dict]], only_mode: str | None = None) -> dict:
    """`tree` with the `set` of every rule whose groups all match tree's; only_mode: only the rules
    about that mode (a saved config put into another mode keeps what its other rules made)."""
    for _path, rule in rules:
        groups = {k: v for k, v in rule.items() if k != "set"}
        if only_mode is not None and groups.get("mode") != only_mode:
            continue
        if all(tree.get(group) == name for group, name in groups.items()):
            tree = _merge(tree, rule["set"])
    return tree


def in_mode(config: Config, mode: str, overrides: typing.Sequence[str] = (),
            config_file: str | os.PathLike | ConfigFile | None = None) -> Config:
    """A resolved config (a snapshot's, a run's) put into `mode`: the mode's preset and the rules
    of its presets about that mode, then the config file's keys, then `key=value` overrides;
    validated. How the commands that use a snapshot (evaluate, plan) take its sizes and their own
    budgets."""
    file = as_config_file(config_file)
    tree = _with_file(_into_mode(to_dict(config), mode), file, mode)
    for key, value in (parse_override(o) for o in overrides):
        _set_dotted(tree, key, value)
    built = _build(Config, tree)
    validate(built)
    return built


MOVED_SECTIONS = {"agent.dads.planner": "agent.planner"}
"""Sections that moved, old key -> new key. Configs saved before the move (in run directories and
snapshots) are read with the section at its new key; typed presets and overrides know the new key only."""


def _moved_sections(tree: dict) -> dict:
    """`tree` (a saved config, modified in place) with the MOVED_SECTIONS at their new keys."""
    for old, new in MOVED_SECTIONS.items():
        *parents, leaf = old.split(".")
        node: Any = tree
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            section = node.pop(leaf)
            *new_parents, new_leaf = new.split(".")
            target = tree
            for name in new_parents:
                target = target.setdefault(name, {})
            target.setdefault(new_leaf, section)
    return tree


def from_dict(data: typing.Mapping[str, Any], overrides: typing.Sequence[str] = (),
              config_file: str | os.PathLike | ConfigFile | None = None) -> Config:
    """A resolved config saved as a plain dict (a snapshot's, `to_dict`), with the config file's
    keys and then `key=value` overrides of any key applied, validated."""
    file = as_config_file(config_file)
    tree = _moved_sections(copy.deepcopy(dict(data)))  # the overrides write into the nested dicts
    tree = _with_file(tree, file, None)
    for key, value in (parse_override(o) for o in overrides):
        _set_dotted(tree, key, value)
    config = _build(Config, tree)
    validate(config)
    return config


def check_run_name(name: str) -> None:
    """`run_name` must be one plain directory name: the run directory is always <logdir>/<run_name>."""
    if name == "":
        return  # <task>-<algo>-<time>
    problem = None
    if not name.strip():
        problem = "it is only whitespace"
    elif name != name.strip():
        problem = "it starts or ends with whitespace"
    elif "/" in name or "\\" in name:
        problem = "it contains a path separator"
    elif name.startswith("."):
        problem = "it starts with '.'" if name not in (".", "..") else "it names the log directory or its parent"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it contains a control character"
    elif len(name.encode()) > 255:
        problem = "it is longer than 255 bytes"
    if problem:
        raise ConfigError(
            f"config key 'run_name': {name!r} is not a plain directory name ({problem}); the run directory "
            f"is always <logdir>/<run_name>: give a single name such as 'walker-seed3' and set the folder with logdir"
        )


def check_env_task(task: str) -> None:
    """`env.task` names a built-in environment or a registered gymnasium one. Cheap: no simulator
    is imported (gymnasium's registry is a dict; `gym:<module>:<id>` imports <module>, which is how
    such an environment gets registered)."""
    from choreo.actors.envs import ENV_IDS, GYM_PREFIX, METAWORLD_IDS, is_gym_id

    listing = "list them with `choreo envs`"
    if is_gym_id(task):
        import gymnasium

        gym_id = task[len(GYM_PREFIX):]
        if ":" in gym_id:
            module, _, gym_id = gym_id.partition(":")
            try:
                importlib.import_module(module)
            except Exception as e:  # ImportError, or the module failing as it registers
                raise ConfigError(
                    f"config key 'env.task': {task!r} names module {module!r}, which cannot be imported "
                    f"({type(e).__name__}: {e})"
                ) from None
        if gym_id not in gymnasium.registry:
            close = difflib.get_close_matches(gym_id, list(gymnasium.registry), n=3)
            hint = f" (did you mean {', '.join(repr(GYM_PREFIX + c) for c in close)}?)" if close else ""
            raise ConfigError(
                f"config key 'env.task': {task!r} is not a registered gymnasium environment{hint}; "
                f"gym:<id> takes an id from gymnasium's registry, gym:<module>:<id> imports <module> first "
                f"for environments that module registers"
            )
        return
    if task in ENV_IDS:
        return
    if task.startswith("mw_"):
        what, valid = "Meta-World task", METAWORLD_IDS
    else:
        what, valid = "environment", ENV_IDS
    close = difflib.get_close_matches(task, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"config key 'env.task': unknown {what} {task!r}{hint}; valid: {', '.join(valid)}"
        + ("" if valid is METAWORLD_IDS else f", or {GYM_PREFIX}<id> for any gymnasium environment")
        + f"; {listing}"
    )


def validate(config: Config) -> None:
    """Combinations that cannot run, caught before anything starts."""
    check_run_name(config.run_name)
    if not config.logdir.strip():
        raise ConfigError("config key 'logdir' must name a folder, got an empty string")
    task = config.env.task
    check_env_task(task)
    if config.suite == "metaworld" and not task.startswith("mw_"):
        raise ConfigError(f"config key 'env.task': suite 'metaworld' needs a Meta-World task (mw_reach), not {task!r}")
    if config.algo == "dads" and config.mode == "finetune":
        raise ConfigError("mode 'finetune' trains Choreographer's meta-controller; DADS adapts zero-shot: plan over "
                          "its skills with choreo plan --snapshot FILE task=<navigation task>")
    if config.algo == "dads" and config.env.obs == "pixels":
        raise ConfigError("config key 'env.obs': DADS learns from states only; use suite=states with algo=dads")
    positive = {
        "env.action_repeat": config.env.action_repeat,
        "env.image_size": config.env.image_size,
        "num_actors": config.num_actors,
        "envs_per_actor": config.envs_per_actor,
        "num_shards": config.num_shards,
        "replay.batch_size": config.replay.batch_size,
        "replay.batch_length": config.replay.batch_length,
        "replay.chunk_length": config.replay.chunk_length,
        "agent.choreographer.num_codes": config.agent.choreographer.num_codes,
        "agent.choreographer.knn_k": config.agent.choreographer.knn_k,
        "agent.choreographer.knn_chunk": config.agent.choreographer.knn_chunk,
        "agent.actor_critic.horizon": config.agent.actor_critic.horizon,
        "learner.total_frames": config.learner.total_frames,
        "learner.publish_every": config.learner.publish_every,
        "learner.log_every": config.learner.log_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {value}")
    if config.env.obs == "pixels" and config.env.image_size != 64:
        raise ConfigError(
            f"config key 'env.image_size': the convolutional encoder takes 64x64 images, got {config.env.image_size}"
        )
    if not 0 <= config.env.goal_index < 50:
        raise ConfigError(f"config key 'env.goal_index' must be in 0..49, got {config.env.goal_index}")
    if config.env.goal_set not in (1, 2, 3):
        raise ConfigError(f"config key 'env.goal_set' must be 1, 2 or 3, got {config.env.goal_set}")
    for key, value in (("learner.threads", config.learner.threads),
                       ("learner.max_nonfinite_updates", config.learner.max_nonfinite_updates),
                       ("learner.seed_frames", config.learner.seed_frames)):
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if not config.learner.checkpoint_minutes > 0:
        raise ConfigError(f"config key 'learner.checkpoint_minutes' must be > 0, got {config.learner.checkpoint_minutes}")
    if config.replay.samples_per_insert < 0:
        raise ConfigError("config key 'replay.samples_per_insert' must be >= 0 (0 switches the limiter off)")
    if config.replay.batch_size * config.replay.batch_length > config.replay.capacity:
        raise ConfigError("config key 'replay.capacity' is smaller than one batch (batch_size x batch_length)")
    if config.eval.every_frames < 0:
        raise ConfigError(f"config key 'eval.every_frames' must be >= 0 (0: no evaluations), got {config.eval.every_frames}")
    if config.monitor.media_every < 0:
        raise ConfigError(f"config key 'monitor.media_every' must be >= 0 (0: no pictures), got {config.monitor.media_every}")
    if config.eval.episodes < 1:
        raise ConfigError(f"config key 'eval.episodes' must be at least 1, got {config.eval.episodes}")
    if config.mode == "finetune" and not (config.snapshot or config.from_scratch):
        raise ConfigError("mode 'finetune' starts from config key 'snapshot' (choreo finetune --snapshot FILE) "
                          "or from random weights with 'from_scratch=true' (--from-scratch)")
    if config.snapshot and config.from_scratch:
        raise ConfigError("config keys 'snapshot' and 'from_scratch' exclude each other")
    if config.from_scratch and config.mode != "finetune":
        raise ConfigError(f"config key 'from_scratch' is for fine-tuning (mode 'finetune'), not mode {config.mode!r}")
    if not 0 < config.agent.choreographer.ema_decay < 1:
        raise ConfigError("config key 'agent.choreographer.ema_decay' must be in (0, 1)")
    if config.eval.every_updates < 0:
        raise ConfigError(f"config key 'eval.every_updates' must be >= 0 (0: no evaluations), got {config.eval.every_updates}")
    if config.learner.total_updates < 1:
        raise ConfigError(f"config key 'learner.total_updates' must be at least 1, got {config.learner.total_updates}")
    check_learner_group(config)
    if config.dataset.collect and not config.dataset.dir:
        raise ConfigError("config key 'dataset.collect' keeps collecting after a dataset is loaded; "
                          "name the dataset with 'dataset.dir' (choreo pretrain --offline DIR)")
    if config.env.goal_radius < 0:
        raise ConfigError(f"config key 'env.goal_radius' must be >= 0 (0: the task's default), got {config.env.goal_radius}")
    if config.env.gym_kwargs:
        if not task.startswith("gym:"):
            raise ConfigError(f"config key 'env.gym_kwargs' passes arguments to gymnasium.make for gym:<id> tasks, "
                              f"not {task!r}")
        from choreo.actors.envs.gym_adapter import parse_gym_kwargs

        try:
            parse_gym_kwargs(config.env.gym_kwargs)
        except ValueError as e:
            raise ConfigError(f"config key 'env.gym_kwargs': {e}") from None
    if config.dataset.dir and config.algo != "choreographer":
        raise ConfigError(f"config key 'dataset.dir': offline datasets carry no skills; pretraining from them is "
                          f"for algo=choreographer, not {config.algo!r}")
    if config.dataset.dir and config.mode != "pretrain":
        raise ConfigError(f"config key 'dataset.dir': datasets are for pretraining (choreo pretrain --offline DIR), "
                          f"not mode {config.mode!r}")


def check_learner_group(config: Config) -> None:
    """Settings of several learners (learner.num_learners) that cannot run."""
    lc, world = config.learner, config.learner.num_learners
    if world < 1:
        raise ConfigError(f"config key 'learner.num_learners' must be at least 1, got {world}")
    if not lc.group_timeout_s > 0:
        raise ConfigError(f"config key 'learner.group_timeout_s' must be > 0, got {lc.group_timeout_s}")
    if lc.gpus_per_learner < 0:
        raise ConfigError(f"config key 'learner.gpus_per_learner' must be >= 0, got {lc.gpus_per_learner}")
    if world == 1:
        return
    if config.algo != "choreographer":
        raise ConfigError(f"config key 'learner.num_learners': several learners train Choreographer; "
                          f"algo={config.algo} trains on one learner (learner.num_learners=1)")
    if lc.device != "cpu" and lc.gpus_per_learner and lc.gpus_per_learner != int(lc.gpus_per_learner):
        raise ConfigError(f"config key 'learner.gpus_per_learner' must be a whole number of GPUs with several "
                          f"learners, got {lc.gpus_per_learner}: NCCL refuses two ranks on one GPU")
    if lc.device == "cuda" and not lc.gpus_per_learner:
        raise ConfigError("config key 'learner.gpus_per_learner' is 0 and learner.device=cuda: each rank needs "
                          "a GPU (or set learner.device=cpu)")
    if lc.scaling == "strong" and config.replay.batch_size % world:
        raise ConfigError(f"config key 'replay.batch_size': learner.scaling=strong splits the batch over "
                          f"learner.num_learners={world} ranks, and {config.replay.batch_size} does not divide by {world}")
    if lc.scaling == "strong" and config.agent.choreographer.knn_pool == "rank":
        raise ConfigError(f"config keys 'learner.scaling' and 'agent.choreographer.knn_pool': learner.scaling=strong "
                          f"splits the batch over learner.num_learners={world} ranks, and knn_pool=rank would score "
                          f"each rank's imagined states among its own share only (a pool {world} times smaller, "
                          f"with longer distances: not the single learner's reward); "
                          f"set agent.choreographer.knn_pool=global")


def rank_batch_size(config: Config) -> int:
    """Sequences in each learner rank's batch: replay.batch_size under weak scaling (or with one
    learner), its share of it under strong scaling."""
    lc = config.learner
    return config.replay.batch_size // lc.num_learners if lc.scaling == "strong" else config.replay.batch_size


def group_batch_size(config: Config) -> int:
    """Sequences one update of the whole learner group trains on (what the rate limiter counts)."""
    return rank_batch_size(config) * config.learner.num_learners


def warmup_steps(config: Config) -> int:
    """Agent steps the replay holds before the learner samples: `replay.min_size` counts frames,
    as the reference's 4,000 seed frames do, so it is divided by the action repeat, rounded up
    (never fewer frames than asked)."""
    return -(-config.replay.min_size // config.env.action_repeat)


# ----------------------------------------------------------------------------- output


def to_dict(config: Any) -> dict:
    """A plain nested dict (tuples as lists) for YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def from_yaml_file(path: Path) -> Config:
    """Read a resolved config back, e.g. from a run directory. Errors name the file."""
    data = _moved_sections(load_yaml(Path(path)))  # its errors name the file already
    try:
        config = _build(Config, data)
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config


def snapshot_shape_keys(config: Config) -> tuple[str, ...]:
    """The keys of the run config that decide the shapes of `config.algo`'s agent, as dotted run
    config keys ("agent.world_model.deter", ...): what `learner.snapshot.load_snapshot(...,
    shape_keys=...)` names when a snapshot does not fit. The algorithm declares them relative to its
    `AgentConfig` (`agents.registry.shape_keys`); this adds the section the run config holds it in."""
    return tuple(f"agent.{key}" for key in registry.shape_keys(config.algo))


RESUME_OVERRIDES = ("learner.total_frames", "learner.total_updates", "learner.checkpoint_minutes",
                    "learner.snapshot_frames", "learner.snapshot_updates",
                    "learner.log_every", "learner.max_nonfinite_updates", "learner.threads", "learner.device",
                    "monitor.media_every", "learner.num_learners", "learner.gpus_per_learner",
                    "learner.group_timeout_s")
"""Keys a resumed run may change: how long it runs, where and how it is watched, never what it
learns (a different number of learners resumes with the same weights, with a warning that its
random draws differ from an uninterrupted run's)."""


def with_overrides(config: Config, overrides: typing.Sequence[str], allowed: typing.Sequence[str]) -> Config:
    """`config` with `key=value` overrides of the `allowed` keys applied, validated."""
    parsed = [parse_override(o) for o in overrides]
    refused = [key for key, _ in parsed if key not in allowed]
    if refused:
        raise ConfigError(f"config key '{refused[0]}' cannot change here; only {', '.join(allowed)} can")
    tree = to_dict(config)
    for key, value in parsed:
        _set_dotted(tree, key, value)
    changed = _build(Config, tree)
    validate(changed)
    return changed

