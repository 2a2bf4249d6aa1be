"""URL benchmark walker and quadruped tasks on dm_control's control suite.

Standard tasks (walker stand/walk/run, quadruped walk/run) are dm_control's own. Walker flip and
quadruped stand/jump are defined here from their reward definitions on dm_control's own models:

- walker flip: stand_reward * (5 * tol(angular momentum >= 5, margin 5, linear) + 1) / 6, where
  the angular momentum is the torso subtree's about the y axis, positive when spinning in the run
  (+x) direction.
- quadruped stand: the upright reward, from a random initial orientation.
- quadruped jump: upright * tol(centre-of-mass height >= 1, margin 1, value_at_margin 0.5, linear).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before dm_control / mujoco are imported

import warnings
from typing import Any

import numpy as np
from dm_control import suite
from dm_control.rl import control
from dm_control.suite import common, quadruped, walker
from dm_control.utils import rewards

from choreo.actors.envs.base import ChoreoEnv, ObsFlattener

# Walker: 25 s at 0.025 s; quadruped: 20 s at 0.02 s.
WALKER_CONTROL_TIMESTEP = 0.025
QUADRUPED_CONTROL_TIMESTEP = 0.02
WALKER_FRAMES = 1000
QUADRUPED_FRAMES = 1000
WALKER_STATE_DIM = 24
QUADRUPED_STATE_DIM = 78

FLIP_SPIN_SPEED = 5.0
JUMP_HEIGHT = 1.0
PIXEL_CAMERA = {"walker": 0, "quadruped": 2}  # walker: side view; quadruped: "y", a side view


# ------------------------------------------------------------------------------------ tasks


class WalkerFlip(walker.PlanarWalker):
    """Walker rewarded for standing while spinning forward about the y axis."""

    def __init__(self, random: Any = None, forward: bool = True) -> None:
        super().__init__(move_speed=0, random=random)
        self._direction = 1.0 if forward else -1.0

    def get_reward(self, physics: walker.Physics) -> float:
        stand_reward = super().get_reward(physics)  # move_speed == 0: the stand reward
        spin = rewards.tolerance(
            self._direction * angular_momentum_y(physics),
            bounds=(FLIP_SPIN_SPEED, float("inf")),
            margin=FLIP_SPIN_SPEED,
            value_at_margin=0,
            sigmoid="linear",
        )
        return stand_reward * (5 * spin + 1) / 6


def angular_momentum_y(physics: Any) -> float:
    """Angular momentum of the walker (torso subtree) about its centre of mass, y component.

    MuJoCo fills `subtree_angmom` in the velocity stage when a subtree sensor exists, which the
    walker model has (`torso_subtreelinvel`)."""
    return float(physics.named.data.subtree_angmom["torso"][1])


class QuadrupedStand(quadruped.Move):
    """Quadruped rewarded for being upright; random initial orientation (as Move)."""

    def __init__(self, random: Any = None) -> None:
        super().__init__(desired_speed=0.0, random=random)

    def get_reward(self, physics: quadruped.Physics) -> float:
        return upright_reward(physics)


class QuadrupedJump(quadruped.Move):
    """Quadruped rewarded for being upright with its centre of mass at least 1 m high."""

    def __init__(self, random: Any = None) -> None:
        super().__init__(desired_speed=0.0, random=random)

    def get_reward(self, physics: quadruped.Physics) -> float:
        jump = rewards.tolerance(
            com_height(physics),
            bounds=(JUMP_HEIGHT, float("inf")),
            margin=JUMP_HEIGHT,
            value_at_margin=0.5,
            sigmoid="linear",
        )
        return upright_reward(physics) * jump


def upright_reward(physics: Any) -> float:
    """1 when the torso's z axis points up, falling linearly to 0 when upside down."""
    return float(
        rewards.tolerance(
            physics.torso_upright(), bounds=(1.0, float("inf")), sigmoid="linear", margin=2.0, value_at_margin=0
        )
    )


def com_height(physics: Any) -> float:
    """Height of the quadruped's centre of mass (the torso subtree's)."""
    return float(physics.named.data.subtree_com["torso"][2])


# ------------------------------------------------------------------------------------ builders


# Floor size of the quadruped model for the tasks defined here (as dm_control's walk task).
_QUADRUPED_FLOOR = 10


def _walker(name: str, rng: np.random.RandomState) -> control.Environment:
    if name != "flip":
        return suite.load("walker", name, task_kwargs={"random": rng, "time_limit": float("inf")})
    physics = walker.Physics.from_xml_string(*walker.get_model_and_assets())
    return control.Environment(
        physics, WalkerFlip(random=rng), time_limit=float("inf"), control_timestep=WALKER_CONTROL_TIMESTEP
    )


def _quadruped(name: str, rng: np.random.RandomState) -> control.Environment:
    if name in ("walk", "run"):
        return suite.load("quadruped", name, task_kwargs={"random": rng, "time_limit": float("inf")})
    xml = quadruped.make_model(floor_size=_QUADRUPED_FLOOR)
    physics = quadruped.Physics.from_xml_string(xml, common.ASSETS)
    task = QuadrupedStand(random=rng) if name == "stand" else QuadrupedJump(random=rng)
    return control.Environment(
        physics, task, time_limit=float("inf"), control_timestep=QUADRUPED_CONTROL_TIMESTEP
    )


DOMAINS = {
    "walker": (_walker, WALKER_FRAMES, WALKER_STATE_DIM),
    "quadruped": (_quadruped, QUADRUPED_FRAMES, QUADRUPED_STATE_DIM),
}


class DMCEnv(ChoreoEnv):
    """A dm_control suite task stepped directly through its task and physics (no dm_env
    TimeStep per frame; the observation is computed once per agent step)."""

    def __init__(self, task: str, obs: str, action_repeat: int, image_size: int, seed: int | None,
                 render_mode: str | None = "rgb_array") -> None:
        domain, name = task.split("_", 1)
        build, frames, state_dim = DOMAINS[domain]
        self._rng = np.random.RandomState(seed)
        self._env = build(name, self._rng)
        self._physics = self._env.physics
        self._task = self._env.task
        self._n_sub_steps = self._env._n_sub_steps
        quality = self._physics.model.vis.quality  # before the first render: ~6x faster on CPU
        quality.shadowsize = 0
        quality.offsamples = 0
        self._camera_id = PIXEL_CAMERA[domain]
        spec = self._env.action_spec()
        self._flatten: ObsFlattener | None = None
        super().__init__(task, obs, action_repeat, image_size, spec.minimum, spec.maximum, frames, state_dim, seed,
                         render_mode=render_mode, frame_seconds=self._env.control_timestep())

    @property
    def physics(self) -> Any:
        return self._physics

    @property
    def dm_task(self) -> Any:
        return self._task

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        if seed is not None:
            self._rng.seed(seed)
        with warnings.catch_warnings():
            # dm_control 1.0.28's quadruped calls np.in1d (deprecated in numpy 2) when it first
            # looks up its sensors, which happens in the first observation of an episode.
            warnings.filterwarnings("ignore", message=".*in1d.*", category=DeprecationWarning)
            self._env.reset()
        return {}

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        self._task.before_step(action, self._physics)
        self._physics.step(self._n_sub_steps)
        self._task.after_step(self._physics)
        return float(self._task.get_reward(self._physics)), False, 0.0

    def _state_obs(self) -> np.ndarray:
        obs = self._task.get_observation(self._physics)
        if self._flatten is None:
            self._flatten = ObsFlattener(obs)
        return self._flatten(obs)

    def _render_frame(self) -> np.ndarray:
        return self._physics.render(self.image_size, self.image_size, camera_id=self._camera_id)

    def reward(self) -> float:
        """The task reward of the current physics state (for tests and debugging)."""
        return float(self._task.get_reward(self._physics))

    def close(self) -> None:
        if getattr(self, "_physics", None) is not None:
            self._physics.free()
            self._physics = None
