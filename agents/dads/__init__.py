"""DADS (Sharma et al., 2020): skill dynamics, the DADS intrinsic reward, SAC, and the skill model
that zero-shot planning in skill space (`choreo.agents.planning`) predicts with.

Importing this package is cheap (no torch): `choreo.agents.config` imports `DadsConfig` from it,
and the command line reads configs without loading torch. The agent and policy classes load on
first use, both as attributes (`choreo.agents.dads.DadsAgent`) and through the registry, where
"dads" is registered with factories that build them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from choreo.agents.dads.config import SHAPE_KEYS, DadsConfig
from choreo.agents.registry import register

if TYPE_CHECKING:
    from choreo.agents.dads.agent import DadsAgent
    from choreo.agents.dads.policy import DadsPolicy


def make_agent(*args: Any, **kwargs: Any) -> DadsAgent:
    """`DadsAgent(obs_shape, action_dim, cfg, seed=0, device="auto", profile=False)`."""
    from choreo.agents.dads.agent import DadsAgent

    return DadsAgent(*args, **kwargs)


def make_policy(*args: Any, **kwargs: Any) -> DadsPolicy:
    """`DadsPolicy(obs_shape, action_dim, cfg, behaviour="explore", seed=0)`."""
    from choreo.agents.dads.policy import DadsPolicy

    return DadsPolicy(*args, **kwargs)


register("dads", make_agent, make_policy, shape_keys=SHAPE_KEYS)


def __getattr__(name: str) -> Any:
    if name == "DadsAgent":
        from choreo.agents.dads.agent import DadsAgent

        return DadsAgent
    if name == "DadsPolicy":
        from choreo.agents.dads.policy import DadsPolicy

        return DadsPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DadsAgent", "DadsConfig", "DadsPolicy", "SHAPE_KEYS", "make_agent", "make_policy"]
