"""Algorithm registry: `algo=<name>` in the config selects the agent and its acting policy."""

from __future__ import annotations

from typing import Any, Callable

_AGENTS: dict[str, Callable[..., Any]] = {}
_POLICIES: dict[str, Callable[..., Any]] = {}


def register(name: str, agent: Callable[..., Any], policy: Callable[..., Any]) -> None:
    _AGENTS[name] = agent
    _POLICIES[name] = policy


def _load_builtin() -> None:
    # Imported on first use so that `import agents.registry` stays cheap.
    import choreo.agents.choreographer  # noqa: F401  (registers "choreographer")


def _lookup(table: dict[str, Callable[..., Any]], name: str) -> Callable[..., Any]:
    if not table:
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


def registered() -> list[str]:
    if not _AGENTS:
        _load_builtin()
    return sorted(_AGENTS)
