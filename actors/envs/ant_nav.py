"""`ant_nav`: gymnasium's `Ant-v5` navigating to goals (the DADS paper's Ant-goal task).

- The simulator is `Ant-v5` (MuJoCo, frame skip 5: one frame here is one gymnasium step of 0.05 s)
  made with `exclude_current_positions_from_observation=False` and
  `include_cfrc_ext_in_observation=False`: the state is qpos (15) + qvel (14) = 29 float32 dims with
  the torso's x, y first (`xy_indices = (0, 1)`), as the DADS reference's Ant.
- `terminate_when_unhealthy=False`: episodes never terminate (an Ant on its back stays there).
- Episode: 200 frames (200 agent steps at the default action repeat 1, 100 at 2), the length of the
  DADS goal evaluation (replanning every 10 steps gives 20 replans).
- Goals are drawn from [-15, 15]^2 metres as in the paper; the reward is `navigation.goal_reward`
  of the torso's x, y (`data.qpos[:2]`) after every frame; Ant-v5's own reward is discarded.
  Default sparse radius: 1.5 m (the reference's "steps until distance < 1.5").
- Pixels: the model's `track` camera, which follows the torso from the side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from choreo.actors.envs.gym_adapter import GymEnv
from choreo.actors.envs.navigation import GoalNavigation

GYM_ID = "Ant-v5"
EPISODE_FRAMES = 200
GOAL_RANGE = 15.0
DEFAULT_RADIUS = 1.5
STATE_DIM = 29
ACTION_DIM = 8
ANT_KWARGS = {
    "exclude_current_positions_from_observation": False,
    "include_cfrc_ext_in_observation": False,
    "terminate_when_unhealthy": False,
    "max_episode_steps": EPISODE_FRAMES,
}


class AntNav(GoalNavigation, GymEnv):
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
        kwargs = {**ANT_KWARGS, "camera_name": "track"}  # pixels and render() alike
        super().__init__(task, obs, action_repeat, image_size, seed, gym_kwargs=kwargs, gym_id=GYM_ID,
                         render_mode=render_mode)
        self._data = self.inner.unwrapped.data

    def current_xy(self) -> np.ndarray:
        return self._data.qpos[:2].copy()

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        super()._reset_sim(seed)  # the Ant's own reset info (its reward terms) is not passed on
        self._reset_goal(seed)
        return self._nav_info()

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        _reward, terminated, _success = super()._frame(action)
        reward, success = self._frame_reward()
        return reward, terminated, success
