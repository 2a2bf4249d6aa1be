"""Typed settings of the environments and the environment workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EnvConfig:
    task: str = "walker_stand"
    """Environment id: a URL benchmark task, `mw_reach`, or `gym:<id>` (see `choreo envs`)."""
    obs: Literal["states", "pixels"] = "states"
    """Observation kind: float32 state vectors or uint8 [3, 64, 64] images."""
    action_repeat: int = 1
    """Environment steps per agent step; rewards are summed over them."""
    image_size: int = 64
    """Height and width of pixel observations."""
    goal_set: int = 1
    """Meta-World goal set: the seed (1, 2 or 3) of the 50 sampled reach goals."""
    goal_index: int = 0
    """Meta-World goal within its set (0..49)."""
