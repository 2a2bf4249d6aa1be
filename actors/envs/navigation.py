"""Navigation to goals in the plane: the interface `point_mass_nav` and `ant_nav` share, the task
reward, and the DADS paper's normalised distance metric.

Every navigation environment's `env.unwrapped` has

- `xy_indices: tuple[int, int]`: where the agent's x and y are in the state observation ((0, 1):
  first, for both tasks);
- `goal: np.ndarray [2]` float64, in the task's length unit (point mass: arena units; Ant: metres):
  drawn at every reset uniformly from the square [-goal_range, goal_range]^2 with the env's own
  generator (seeded by the reset seed, apart from the simulator's), unless fixed;
- `set_goal(goal)`: fixes the goal, from now on and for every later episode (evaluation on given
  goals); `set_goal(None)` goes back to drawing one per reset;
- `goal_reward(xy [..., 2], goal [2] or [..., 2] = env.goal) -> [...]` float64: the task reward
  of positions, vectorised (for planners scoring predicted states): dense = -||xy - goal||,
  sparse = 1[||xy - goal|| <= goal_radius]; `goal_reward_kind` and `goal_radius` say which;
- the step reward: `goal_reward` of the real position after each simulator frame, summed over the
  action repeat (at action repeat 1 exactly `goal_reward(info["xy"], env.goal)`);
- `info["xy"]` (float64 [2], the position after the step or reset) and `info["goal"]` on every
  reset and step; `info["success"]`: 1.0 when any frame of the step ended within `goal_radius`.

`normalised_distance(xys [T+1, 2], goal)` is the paper's Delta (lower is better): the mean over
t = 1..T of ||g - u_t|| / ||g - u_0||; 1.0 for standing still, 0.0 for being at the goal throughout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

GOAL_REWARDS = ("dense", "sparse")
GOAL_SEED_SALT = 0x60A1
"""Mixed into the reset seed for the goal generator, so that goals and the simulator's initial
state (seeded with the plain seed) are independent streams."""


def goal_distance(xy: ArrayLike, goal: ArrayLike) -> np.ndarray:
    """||xy - goal|| over the last axis: xy [..., 2], goal [2] or [..., 2] -> [...] float64."""
    xy = np.asarray(xy, np.float64)
    goal = np.asarray(goal, np.float64)
    if xy.shape[-1:] != (2,) or goal.shape[-1:] != (2,):
        raise ValueError(f"positions and goals must have a last axis of size 2, got {xy.shape} and {goal.shape}")
    d = xy - goal
    return np.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2)


def goal_reward(xy: ArrayLike, goal: ArrayLike, kind: str = "dense", radius: float = 1.0) -> np.ndarray:
    """The navigation reward of positions xy [..., 2] for goal [2] (or [..., 2]) -> [...] float64:
    dense = -||xy - goal||, sparse = 1[||xy - goal|| <= radius]."""
    dist = goal_distance(xy, goal)
    if kind == "dense":
        return -dist
    if kind == "sparse":
        return (dist <= radius).astype(np.float64)
    raise ValueError(f"goal reward must be one of {GOAL_REWARDS}, got {kind!r}")


def normalised_distance(xys: ArrayLike, goal: ArrayLike) -> float:
    """Delta = (1/T) sum_{t=1..T} ||g - u_t|| / ||g - u_0|| of a trajectory xys [T+1, 2] (u_0 the
    start position) and a goal [2]. Raises ValueError when the start is at the goal."""
    xys = np.asarray(xys, np.float64)
    if xys.ndim != 2 or xys.shape[1] != 2 or len(xys) < 2:
        raise ValueError(f"a trajectory of positions [T+1, 2] with T >= 1 is needed, got shape {xys.shape}")
    dist = goal_distance(xys, np.asarray(goal, np.float64).reshape(2))
    if dist[0] == 0.0:
        raise ValueError("the trajectory starts at the goal: the normalised distance is undefined")
    return float(np.mean(dist[1:]) / dist[0])


def sample_goal(rng: np.random.Generator, goal_range: float) -> np.ndarray:
    """A goal [2] float64 uniform in [-goal_range, goal_range]^2."""
    return rng.uniform(-goal_range, goal_range, size=2)


class GoalNavigation:
    """The navigation interface, mixed into a `ChoreoEnv` subclass (listed before it).

    The subclass calls `_init_navigation` in its constructor, `_reset_goal(seed)` in `_reset_sim`
    (returning `_nav_info(xy)` as the reset info), computes its frame reward with `goal_reward`
    and implements `current_xy()`. `step` adds `info["xy"]` and `info["goal"]`.
    """

    xy_indices: tuple[int, int] = (0, 1)
    has_success = True

    def _init_navigation(self, goal_range: float, kind: str, radius: float) -> None:
        if kind not in GOAL_REWARDS:
            raise ValueError(f"goal_reward must be one of {GOAL_REWARDS}, got {kind!r}")
        if not (np.isfinite(radius) and radius > 0):
            raise ValueError(f"goal_radius must be a positive number, got {radius!r}")
        self.goal_range = float(goal_range)
        self.goal_reward_kind = kind
        self.goal_radius = float(radius)
        self.goal = np.zeros(2)
        self._fixed_goal: np.ndarray | None = None
        self._goal_rng: np.random.Generator | None = None

    def current_xy(self) -> np.ndarray:
        """The agent's position now, float64 [2]."""
        raise NotImplementedError

    def set_goal(self, goal: ArrayLike | None) -> None:
        """Fix the goal [2] for the current and every later episode; None: draw one per reset."""
        if goal is None:
            self._fixed_goal = None
            return
        goal = np.array(goal, np.float64).reshape(-1)
        if goal.shape != (2,) or not np.all(np.isfinite(goal)):
            raise ValueError(f"a goal is a finite [x, y], got {goal!r}")
        self._fixed_goal = goal
        self.goal = goal.copy()

    def goal_reward(self, xy: ArrayLike, goal: ArrayLike | None = None) -> np.ndarray:
        """The task reward of positions xy [..., 2] for goal [2] or [..., 2] (default: the current
        goal) -> [...] float64, with this env's reward kind and radius."""
        return goal_reward(xy, self.goal if goal is None else goal, self.goal_reward_kind, self.goal_radius)

    def _frame_reward(self) -> tuple[float, float]:
        """(reward, success) of the current position."""
        dist = float(goal_distance(self.current_xy(), self.goal))
        success = float(dist <= self.goal_radius)
        return (-dist if self.goal_reward_kind == "dense" else success), success

    def _reset_goal(self, seed: int | None) -> None:
        """Draw this episode's goal (the generator is reseeded when `seed` is given); a fixed goal
        still consumes its draw, so that fixing one changes nothing else."""
        if seed is not None:
            self._goal_rng = np.random.default_rng([int(seed), GOAL_SEED_SALT])
        elif self._goal_rng is None:
            self._goal_rng = np.random.default_rng()
        drawn = sample_goal(self._goal_rng, self.goal_range)
        self.goal = drawn if self._fixed_goal is None else self._fixed_goal.copy()

    def _nav_info(self) -> dict[str, Any]:
        return {"xy": self.current_xy().copy(), "goal": self.goal.copy()}

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)  # type: ignore[misc]
        info.update(self._nav_info())
        return obs, reward, terminated, truncated, info
