"""Algorithm registry: `algo=<name>` in the config selects the agent and its acting policy.

Each entry also declares which keys of the agent's config (`AgentConfig`, dotted and relative to it,
e.g. "world_model.deter") decide the shapes of the agent's tensors, so that code which checks a saved
agent against a fresh one (snapshots, in `learner/`) can name the keys that differ without knowing
any algorithm's config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

_AGENTS: dict[str, Callable[..., Any]] = {}
_POLICIES: dict[str, Callable[..., Any]] = {}
_SHAPE_KEYS: dict[str, tuple[str, ...]] = {}


def register(name: str, agent: Callable[..., Any], policy: Callable[..., Any],
             shape_keys: Sequence[str] | None = None) -> None:
    """Register algorithm `name`. shape_keys: the agent config's keys (relative to `AgentConfig`)
    that decide tensor shapes; None takes the agent class's `SHAPE_KEYS` (none if it has none)."""
    _AGENTS[name] = agent
    _POLICIES[name] = policy
    _SHAPE_KEYS[name] = tuple(getattr(agent, "SHAPE_KEYS", ()) if shape_keys is None else shape_keys)


def _load_builtin() -> None:
    # Imported on first use so that `import agents.registry` stays cheap.
    import choreo.agents.choreographer  # noqa: F401  (registers "choreographer")
    import choreo.agents.dads  # noqa: F401  (registers "dads")


def _lookup(table: dict[str, Any], name: str) -> Any:
    if name not in table:  # e.g. only one built-in package was imported so far
        _load_builtin()
    if name not in table:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(table))}")
    return table[name]


def make_agent(name: str, *args: Any, **kwargs: Any) -> Any:
    """The learner-side agent of algorithm `name`."""
    return _lookup(_AGENTS, name)(*args, **kwargs)


def make_policy(name: str, *args: Any, **kwargs: Any) -> Any:
    """The acting policy of algorithm `name` (what environment workers run)."""
    return _lookup(_POLICIES, name)(*args, **kwargs)


def shape_keys(name: str) -> tuple[str, ...]:
    """The keys of algorithm `name`'s agent config (dotted, relative to `AgentConfig`, e.g.
    "world_model.deter") that decide the shapes of its tensors."""
    return _lookup(_SHAPE_KEYS, name)


def registered() -> list[str]:
    _load_builtin()
    return sorted(_AGENTS)
