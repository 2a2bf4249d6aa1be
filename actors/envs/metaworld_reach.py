"""Meta-World sparse reach (`mw_reach`): Sawyer `reach-v3` with goals from fixed goal sets.

- Goal set s: 50 goals drawn uniformly from the box (-0.45, 0.3, 0.1)..(0.45, 0.9, 0.5) with
  `numpy.random.default_rng(s)`; `goal_index` picks one. The goal is set by freezing the task's
  random vector (no pickled task objects).
- Reward: the success flag (hand within 0.05 m of the goal) summed over the action repeat.
- Episode: 500 simulator frames (250 agent steps at action repeat 2); never terminates.
- States: the 39-dim observation as float32, goal observable (obs[-3:] is the goal).
- Pixels: the `corner4` camera (Meta-World's corner2 view moved to (0.75, 0.075, 0.7)), flipped
  upright (MuJoCo renders this camera upside down).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported

import atexit
import warnings
import weakref
from typing import Any

import numpy as np

from choreo.actors.envs.base import ChoreoEnv

GOAL_LOW = np.array([-0.45, 0.3, 0.1])
GOAL_HIGH = np.array([0.45, 0.9, 0.5])
GOALS_PER_SET = 50
EPISODE_FRAMES = 500
STATE_DIM = 39
ACTION_DIM = 4
CAMERA = "corner4"
# Where the (irrelevant) puck is put: the default spot, or a second one when the goal is
# within 0.15 m of it in xy (reach-v3 resamples until puck and goal are 0.15 m apart, which a
# frozen random vector would never satisfy).
_PUCK_SPOTS = (np.array([0.0, 0.6, 0.02]), np.array([0.3, 0.6, 0.02]))


# Renderers still open at interpreter exit are closed before EGL is torn down (otherwise their
# finalizers print EGL errors). The hook is re-registered after each renderer is created so that
# it runs before the EGL termination hooks that MuJoCo registers (atexit runs last-in, first-out).
_OPEN_ENVS: weakref.WeakSet = weakref.WeakSet()


def _close_renderers() -> None:
    for env in list(_OPEN_ENVS):
        env._close_renderer()


def metaworld_goals(goal_set: int) -> np.ndarray:
    """The 50 reach goals [50, 3] of a goal set (its integer seed)."""
    rng = np.random.default_rng(goal_set)
    return rng.uniform(GOAL_LOW, GOAL_HIGH, size=(GOALS_PER_SET, 3))


def _puck_position(goal: np.ndarray) -> np.ndarray:
    for spot in _PUCK_SPOTS:
        if np.linalg.norm(spot[:2] - goal[:2]) >= 0.15:
            return spot
    raise AssertionError("unreachable: the puck spots are 0.3 m apart")


class MetaWorldReach(ChoreoEnv):
    has_success = True

    def __init__(
        self,
        task: str,
        obs: str,
        action_repeat: int,
        image_size: int,
        seed: int | None,
        goal_set: int = 1,
        goal_index: int = 0,
        render_mode: str | None = "rgb_array",
    ) -> None:
        if not 0 <= goal_index < GOALS_PER_SET:
            raise ValueError(f"{task}: goal_index must be in [0, {GOALS_PER_SET}), got {goal_index}")
        from gymnasium.spaces import Box
        from metaworld.envs.sawyer_reach_v3 import SawyerReachEnvV3

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._mw = SawyerReachEnvV3()
        mw = self._mw
        self.goal_set = goal_set
        self.goal_index = goal_index
        self.goal = metaworld_goals(goal_set)[goal_index]
        # Goal observable, with an observation box wide enough not to clip the harder goals.
        mw.goal_space = Box(GOAL_LOW, GOAL_HIGH, dtype=np.float64)
        mw._partially_observable = False
        mw.__dict__.pop("sawyer_observation_space", None)  # cached_property: recompute
        mw._set_task_called = True
        mw._freeze_rand_vec = True
        mw._last_rand_vec = np.concatenate([_puck_position(self.goal), self.goal])
        mw.max_path_length = 1 << 62  # our own time limit, in agent steps, applies
        quality = mw.model.vis.quality  # before the first render: ~6x faster on CPU
        quality.shadowsize = 0
        quality.offsamples = 0
        self._renderer: Any = None
        self._last_obs: np.ndarray | None = None
        super().__init__(
            task, obs, action_repeat, image_size, -np.ones(ACTION_DIM), np.ones(ACTION_DIM),
            EPISODE_FRAMES, STATE_DIM, seed, render_mode=render_mode, frame_seconds=mw.dt,
        )  # fmt: skip

    @property
    def unwrapped_metaworld(self) -> Any:
        return self._mw

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        # reach-v3's reset is deterministic once the random vector is frozen: nothing to seed.
        obs, _ = self._mw.reset()
        self._last_obs = obs
        return {"goal": self.goal.copy()}

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        obs, _r, _term, _trunc, info = self._mw.step(action)
        self._last_obs = obs
        success = float(info["success"])
        return success, False, success

    def _state_obs(self) -> np.ndarray:
        return self._last_obs.astype(np.float32)

    def _render_frame(self) -> np.ndarray:
        if self._renderer is None:
            import mujoco

            self._renderer = mujoco.Renderer(self._mw.model, self.image_size, self.image_size)
            _OPEN_ENVS.add(self)
            atexit.unregister(_close_renderers)
            atexit.register(_close_renderers)
        self._renderer.update_scene(self._mw.data, camera=CAMERA)
        return self._renderer.render()[::-1]

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        _OPEN_ENVS.discard(self)

    def close(self) -> None:
        self._close_renderer()
        mw = getattr(self, "_mw", None)
        if mw is not None:
            mw.close()
            self._mw = None
