"""URL benchmark Jaco reach: a composer task on dm_control's Jaco arm and hand.

A Duplo brick marks the target at a fixed corner of the workspace, (+-0.09, +-0.09, 0.001)
before it settles on the table, with a uniformly random rotation about z. The tool centre point
starts uniformly in the box (-0.1, -0.1, 0.2)..(0.1, 0.1, 0.4), pointing down. Reward =
tolerance(||tool centre point - brick||, bounds (0, 0.05), margin 0.05) (Gaussian), success =
the tool centre within 0.05 m. An episode is 10 s at a control timestep of 0.04 s: 250 frames.
Observations are the arm, hand and brick feature observables (55 dims), without any
target-position observable. Pixels come from the `front_close` camera of dm_control's
manipulation suite, which sees the arm and all four targets.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before dm_control / mujoco are imported

from typing import Any

import numpy as np
from dm_control import composer
from dm_control.composer import initializers
from dm_control.composer.variation import distributions
from dm_control.entities import props
from dm_control.manipulation.shared import arenas, cameras, observations, robots, workspaces
from dm_control.utils import rewards

from choreo.actors.envs.base import ChoreoEnv, ObsFlattener

TARGETS = {
    "top_left": (-0.09, 0.09, 0.001),
    "top_right": (0.09, 0.09, 0.001),
    "bottom_left": (-0.09, -0.09, 0.001),
    "bottom_right": (0.09, -0.09, 0.001),
}
TCP_LOW = (-0.1, -0.1, 0.2)
TCP_HIGH = (0.1, 0.1, 0.4)
TARGET_RADIUS = 0.05
CONTROL_TIMESTEP = 0.04
EPISODE_FRAMES = 250  # 10 s / 0.04 s
STATE_DIM = 55
ACTION_DIM = 9
CAMERA = cameras.FRONT_CLOSE.name


class JacoReach(composer.Task):
    """Bring the Jaco hand's tool centre point to a Duplo brick at a fixed position."""

    def __init__(self, target: tuple[float, float, float]) -> None:
        settings = observations.PERFECT_FEATURES
        self._arena = arenas.Standard()
        self._arm = robots.make_arm(obs_settings=settings)
        self._hand = robots.make_hand(obs_settings=settings)
        self._arm.attach(self._hand)
        self._arena.attach_offset(self._arm, offset=robots.ARM_OFFSET)
        self.control_timestep = CONTROL_TIMESTEP
        # The camera element is added to the arena; its observable stays disabled (we render
        # through physics.render with our own size).
        cameras.add_camera_observables(self._arena, settings, cameras.FRONT_CLOSE)
        self._prop = props.Duplo(
            observable_options=observations.make_options(settings, observations.FREEPROP_OBSERVABLES)
        )
        self._target_frame = self._arena.add_free_entity(self._prop)
        self._tcp_initializer = initializers.ToolCenterPointInitializer(
            self._hand,
            self._arm,
            position=distributions.Uniform(TCP_LOW, TCP_HIGH),
            quaternion=workspaces.DOWN_QUATERNION,
        )
        self._prop_placer = initializers.PropPlacer(
            props=[self._prop],
            position=np.asarray(target, np.float64),
            quaternion=workspaces.uniform_z_rotation,
            settle_physics=True,
        )
        quality = self._arena.mjcf_model.visual.quality  # before compilation: fast CPU renders
        quality.shadowsize = 0
        quality.offsamples = 0

    @property
    def root_entity(self) -> Any:
        return self._arena

    @property
    def prop(self) -> Any:
        return self._prop

    @property
    def hand(self) -> Any:
        return self._hand

    def tcp_position(self, physics: Any) -> np.ndarray:
        return np.array(physics.bind(self._hand.tool_center_point).xpos)

    def target_position(self, physics: Any) -> np.ndarray:
        return np.array(physics.bind(self._target_frame).xpos)

    def distance(self, physics: Any) -> float:
        return float(np.linalg.norm(self.tcp_position(physics) - self.target_position(physics)))

    def get_reward(self, physics: Any) -> float:
        return float(rewards.tolerance(self.distance(physics), bounds=(0, TARGET_RADIUS), margin=TARGET_RADIUS))

    def initialize_episode(self, physics: Any, random_state: np.random.RandomState) -> None:
        self._hand.set_grasp(physics, close_factors=random_state.uniform())
        self._tcp_initializer(physics, random_state)
        self._prop_placer(physics, random_state)


class JacoEnv(ChoreoEnv):
    """`jaco_reach_<corner>` as a ChoreoEnv over a composer.Environment."""

    has_success = True

    def __init__(self, task: str, obs: str, action_repeat: int, image_size: int, seed: int | None,
                 render_mode: str | None = "rgb_array") -> None:
        corner = task[len("jaco_reach_"):]
        self._rng = np.random.RandomState(seed)
        self._task = JacoReach(TARGETS[corner])
        self._env = composer.Environment(
            self._task,
            time_limit=float("inf"),
            random_state=self._rng,
            strip_singleton_obs_buffer_dim=True,
        )
        self._last_obs: dict[str, Any] | None = None
        self._flatten: ObsFlattener | None = None
        spec = self._env.action_spec()
        super().__init__(
            task, obs, action_repeat, image_size, spec.minimum, spec.maximum, EPISODE_FRAMES, STATE_DIM, seed,
            render_mode=render_mode, frame_seconds=CONTROL_TIMESTEP,
        )

    @property
    def physics(self) -> Any:
        return self._env.physics

    @property
    def composer_task(self) -> JacoReach:
        return self._task

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        if seed is not None:
            self._rng.seed(seed)
        self._last_obs = self._env.reset().observation
        return {}

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        ts = self._env.step(action)
        self._last_obs = ts.observation
        reward = float(ts.reward)
        return reward, False, 1.0 if reward >= 1.0 else 0.0

    def _state_obs(self) -> np.ndarray:
        if self._flatten is None:
            self._flatten = ObsFlattener(self._last_obs)
        return self._flatten(self._last_obs)

    def _render_frame(self) -> np.ndarray:
        return self._env.physics.render(self.image_size, self.image_size, camera_id=CAMERA)

    def reward(self) -> float:
        """The task reward of the current physics state (for tests and debugging)."""
        return self._task.get_reward(self._env.physics)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None
