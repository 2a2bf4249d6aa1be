"""`point_mass_nav`: a 2-D point mass navigating to goals, pure numpy (no simulator).

Dynamics, one frame of DT = 0.1 s, deterministic (the only randomness is the goal):
- the action a in [-1, 1]^2 is an acceleration command, scaled to ACCEL = 5 units/s^2 per axis;
- v <- DAMPING * v + DT * ACCEL * a, with DAMPING = 0.9 (top speed 5 units/s, 0.5 units a frame);
- p <- p + DT * v, then clipped to the arena [-ARENA, ARENA]^2 (ARENA = 10 units); an axis that
  hits a wall loses its velocity (inelastic walls).
Every episode starts at rest at the origin; goals are drawn from the whole arena [-10, 10]^2.
Episode: 200 frames (200 agent steps at the default action repeat 1, 100 at 2); never terminates.

States: float32 [x, y, vx, vy] (units, units/s; x-y first, `xy_indices = (0, 1)`).
Pixels: a top view of the whole arena, drawn with numpy: light floor, the goal's success disc
(radius `goal_radius`) in green, the agent a red disc of radius 0.6 units; up is +y.
Reward and the navigation interface: see `navigation.py`. Default sparse radius: 1 unit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from choreo.actors.envs.base import ChoreoEnv
from choreo.actors.envs.navigation import GoalNavigation

DT = 0.1
ACCEL = 5.0
DAMPING = 0.9
ARENA = 10.0
GOAL_RANGE = ARENA
EPISODE_FRAMES = 200
STATE_DIM = 4
ACTION_DIM = 2
DEFAULT_RADIUS = 1.0
AGENT_RADIUS = 0.6

_FLOOR = np.array([225, 225, 215], np.uint8)
_GOAL = np.array([60, 170, 60], np.uint8)
_AGENT = np.array([210, 40, 40], np.uint8)


class PointMassNav(GoalNavigation, ChoreoEnv):
    def __init__(
        self,
        task: str,
        obs: str,
        action_repeat: int,
        image_size: int,
        seed: int | None,
        goal_reward: str = "dense",
        goal_radius: float | None = None,
        render_mode: str | None = "rgb_array",
    ) -> None:
        self._init_navigation(GOAL_RANGE, goal_reward, DEFAULT_RADIUS if goal_radius is None else goal_radius)
        self.pos = np.zeros(2)
        self.vel = np.zeros(2)
        super().__init__(
            task, obs, action_repeat, image_size, -ACCEL * np.ones(ACTION_DIM), ACCEL * np.ones(ACTION_DIM),
            EPISODE_FRAMES, STATE_DIM, seed, render_mode=render_mode, frame_seconds=DT,
        )  # fmt: skip
        # World coordinates of the pixel centres (row 0 at the top: y = +ARENA).
        centres = -ARENA + (np.arange(self.image_size) + 0.5) * (2 * ARENA / self.image_size)
        self._px = centres[None, :]
        self._py = centres[::-1, None]

    def current_xy(self) -> np.ndarray:
        return self.pos

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        self._reset_goal(seed)
        self.pos = np.zeros(2)
        self.vel = np.zeros(2)
        return self._nav_info()

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        vel = DAMPING * self.vel + DT * action  # action: native acceleration in [-ACCEL, ACCEL]
        pos = self.pos + DT * vel
        wall = np.abs(pos) > ARENA
        if wall.any():
            pos = np.clip(pos, -ARENA, ARENA)
            vel = np.where(wall, 0.0, vel)
        self.pos, self.vel = pos, vel
        reward, success = self._frame_reward()
        return reward, False, success

    def _state_obs(self) -> np.ndarray:
        return np.array([self.pos[0], self.pos[1], self.vel[0], self.vel[1]], np.float32)

    def _disc(self, centre: np.ndarray, radius: float) -> np.ndarray:
        return (self._px - centre[0]) ** 2 + (self._py - centre[1]) ** 2 <= radius**2

    def _render_frame(self) -> np.ndarray:
        image = np.empty((self.image_size, self.image_size, 3), np.uint8)
        image[:] = _FLOOR
        image[self._disc(self.goal, self.goal_radius)] = _GOAL
        image[self._disc(self.pos, AGENT_RADIUS)] = _AGENT
        return image
