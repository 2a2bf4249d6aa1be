"""Typed settings of the environments and the environment workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EnvConfig:
    task: str = "walker_stand"
    """Environment id: a URL benchmark task, `mw_reach`, `point_mass_nav`, `ant_nav`, or `gym:<id>`
    (see `choreo envs`)."""
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
    goal_reward: Literal["dense", "sparse"] = "dense"
    """Navigation tasks (point_mass_nav, ant_nav): the reward for the goal, dense (minus the x-y
    distance to it) or sparse (1 within goal_radius of it, else 0)."""
    goal_radius: float = 0.0
    """Navigation tasks: the sparse reward's radius around the goal, also the success radius
    (0: the task's default, 1 unit for point_mass_nav, 1.5 m for ant_nav)."""
    gym_kwargs: tuple[str, ...] = ()
    """gym:<id> tasks: keyword arguments for gymnasium.make as name=value entries (values read as
    YAML), e.g. [exclude_current_positions_from_observation=false] puts Ant-v5's x, y first for
    DADS's x-y prior."""
