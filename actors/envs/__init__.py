"""Environments: the URL benchmark on dm_control, Meta-World sparse reach, navigation to goals
(`point_mass_nav`, `ant_nav`), any gymnasium env.

Every environment is a gymnasium.Env with a Box action space in [-1, 1], float32 flat state
observations or uint8 [3, S, S] pixel observations, rewards summed over the action repeat and an
episode length counted in agent steps (`truncated` on the last step; the built-in tasks never
terminate). Build one with `make_env` / `make_env_from_config`, or through gymnasium: importing this
package registers every id as `choreo/<id>`, and gymnasium imports it for an id that names it,
`gymnasium.make("choreo.actors.envs:choreo/walker_flip", obs="pixels")` (gymnasium 1.x loads no
plugins from entry points, so the plain `choreo/walker_flip` needs `import choreo.actors.envs` first).
Rendering follows gymnasium: `render_mode="rgb_array"` (the default) and `render()` returns the
frame [H, W, 3] uint8; through `gymnasium.make`, "rgb_array_list" collects the frames.

The navigation tasks share an interface on `env.unwrapped` for planners and evaluation (`xy_indices`,
`goal`, `set_goal`, `goal_reward`, `info["xy"]`) and the normalised distance metric: see
`navigation.py`; `point_mass.py` and `ant_nav.py` document their dynamics, lengths and ranges.

Importing this package is cheap: dm_control, Meta-World and MuJoCo load on the first `make_env`.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # pixels render on the CPU; before mujoco is imported

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import gymnasium

from choreo.actors.envs.base import OBS_KINDS, RENDER_MODES, check_render_mode
from choreo.actors.envs.navigation import GOAL_REWARDS, normalised_distance

if TYPE_CHECKING:
    import numpy as np

    from choreo.actors.config import EnvConfig

URLB_IDS = (
    "walker_stand", "walker_walk", "walker_run", "walker_flip",
    "quadruped_stand", "quadruped_walk", "quadruped_run", "quadruped_jump",
    "jaco_reach_top_left", "jaco_reach_top_right", "jaco_reach_bottom_left", "jaco_reach_bottom_right",
)  # fmt: skip
METAWORLD_IDS = ("mw_reach",)
NAV_IDS = ("point_mass_nav", "ant_nav")
ENV_IDS = URLB_IDS + METAWORLD_IDS + NAV_IDS
GYM_PREFIX = "gym:"
REGISTRY_PREFIX = "choreo/"


def is_gym_id(task: str) -> bool:
    return task.startswith(GYM_PREFIX) and len(task) > len(GYM_PREFIX)


@dataclass(frozen=True)
class EnvSpec:
    """Static facts about an environment id."""

    id: str
    domain: str
    """walker, quadruped, jaco, metaworld, point_mass, ant or gym."""
    episode_frames: int | None
    """Simulator frames (control steps) per episode; None: no time limit."""
    episode_length_ar1: int | None
    """Agent steps per episode at action repeat 1."""
    episode_length_ar2: int | None
    """Agent steps per episode at action repeat 2."""
    supports_pixels: bool
    has_success: bool
    """Whether `info["success"]` is reported."""
    state_dim: int
    action_dim: int
    default_action_repeat_states: int = 1
    default_action_repeat_pixels: int = 2

    def episode_length(self, action_repeat: int) -> int | None:
        """Agent steps per episode at the given action repeat."""
        return None if self.episode_frames is None else math.ceil(self.episode_frames / action_repeat)

    def default_action_repeat(self, obs: str) -> int:
        return self.default_action_repeat_pixels if obs == "pixels" else self.default_action_repeat_states


# Frames, state and action dims of the built-in domains (the tests check them against the envs).
_BUILTIN = {
    # domain: (frames, state_dim, action_dim, has_success, AR for states, AR for pixels)
    "walker": (1000, 24, 6, False, 1, 2),
    "quadruped": (1000, 78, 12, False, 1, 2),
    "jaco": (250, 55, 9, True, 1, 2),
    "metaworld": (500, 39, 4, True, 2, 2),
    "point_mass": (200, 4, 2, True, 1, 2),
    "ant": (200, 29, 8, True, 1, 2),
}
_NAV_DOMAINS = {"point_mass_nav": "point_mass", "ant_nav": "ant"}


def _domain(task: str) -> str:
    if task in METAWORLD_IDS:
        return "metaworld"
    if task in _NAV_DOMAINS:
        return _NAV_DOMAINS[task]
    return task.split("_", 1)[0]


def _unknown(task: str) -> ValueError:
    close = difflib.get_close_matches(task, ENV_IDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(
        f"unknown environment id {task!r}{hint}; valid: {', '.join(ENV_IDS)}, "
        f"or {GYM_PREFIX}<id> for any gymnasium environment with a Box action space"
    )


def env_spec(task: str) -> EnvSpec:
    """Static facts about `task`. For gym ids the environment is built once to read its spaces."""
    if task in ENV_IDS:
        domain = _domain(task)
        frames, state_dim, action_dim, success, ar_states, ar_pixels = _BUILTIN[domain]
        return EnvSpec(
            id=task,
            domain=domain,
            episode_frames=frames,
            episode_length_ar1=frames,
            episode_length_ar2=math.ceil(frames / 2),
            supports_pixels=True,
            has_success=success,
            state_dim=state_dim,
            action_dim=action_dim,
            default_action_repeat_states=ar_states,
            default_action_repeat_pixels=ar_pixels,
        )
    if is_gym_id(task):
        return _gym_spec(task)
    raise _unknown(task)


@cache
def _gym_spec(task: str) -> EnvSpec:
    env = make_env(task, "states")
    try:
        frames = env.episode_frames
        render_modes = env.inner.metadata.get("render_modes", [])
        return EnvSpec(
            id=task,
            domain="gym",
            episode_frames=frames,
            episode_length_ar1=frames,
            episode_length_ar2=None if frames is None else math.ceil(frames / 2),
            supports_pixels="rgb_array" in render_modes,
            has_success=False,
            state_dim=int(env.observation_space.shape[0]),
            action_dim=int(env.action_space.shape[0]),
        )
    finally:
        env.close()


def make_env(
    task: str,
    obs: str = "states",
    seed: int = 0,
    action_repeat: int | None = None,
    image_size: int = 64,
    goal_set: int = 1,
    goal_index: int = 0,
    goal_reward: str = "dense",
    goal_radius: float = 0.0,
    gym_kwargs: Iterable[str] | Mapping[str, Any] = (),
    render_mode: str | None = "rgb_array",
) -> gymnasium.Env:
    """Build environment `task`.

    obs: "states" (float32 [D]) or "pixels" (uint8 [3, image_size, image_size]).
    seed: seeds the first episode (and the action space); `reset(seed=...)` reseeds.
    action_repeat: frames per agent step, rewards summed; None: 1 for states, 2 for pixels
        (mw_reach: 2 for both).
    goal_set, goal_index: the Meta-World reach goal (ignored by other tasks).
    goal_reward, goal_radius: the navigation tasks' reward, "dense" (-distance to the goal) or
        "sparse" (1 within goal_radius of it); goal_radius 0: the task's default (point_mass_nav
        1 unit, ant_nav 1.5 m). Ignored by other tasks.
    gym_kwargs: keyword arguments for `gymnasium.make` of a `gym:<id>` task, `name=value` entries
        (values read as YAML) or a mapping; refused for the other tasks.
    render_mode: "rgb_array" (`render()` returns the frame [image_size, image_size, 3] uint8; a
        `gym:<id>` states environment whose id cannot render gets None) or None.
    """
    if obs not in OBS_KINDS:
        raise ValueError(f"obs must be one of {OBS_KINDS}, got {obs!r}")
    check_render_mode(render_mode)
    if task not in ENV_IDS and not is_gym_id(task):
        raise _unknown(task)
    if action_repeat is None:
        action_repeat = (2 if obs == "pixels" else 1) if is_gym_id(task) else env_spec(task).default_action_repeat(obs)
    if isinstance(action_repeat, bool) or not isinstance(action_repeat, int) or action_repeat < 1:
        raise ValueError(f"action_repeat must be a positive integer, got {action_repeat!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if goal_reward not in GOAL_REWARDS:
        raise ValueError(f"goal_reward must be one of {GOAL_REWARDS}, got {goal_reward!r}")
    if isinstance(goal_radius, bool) or not isinstance(goal_radius, (int, float)) or not 0 <= goal_radius < math.inf:
        raise ValueError(f"goal_radius must be a number >= 0 (0: the task's default), got {goal_radius!r}")
    if gym_kwargs and not is_gym_id(task):
        raise ValueError(f"gym_kwargs apply to gym:<id> tasks only, not {task!r}")

    if is_gym_id(task):
        from choreo.actors.envs.gym_adapter import GymEnv

        return GymEnv(task, obs, action_repeat, image_size, seed, gym_kwargs=gym_kwargs, render_mode=render_mode)
    domain = _domain(task)
    radius = float(goal_radius) if goal_radius > 0 else None
    if domain == "point_mass":
        from choreo.actors.envs.point_mass import PointMassNav

        return PointMassNav(task, obs, action_repeat, image_size, seed, goal_reward=goal_reward, goal_radius=radius,
                            render_mode=render_mode)
    if domain == "ant":
        from choreo.actors.envs.ant_nav import AntNav

        return AntNav(task, obs, action_repeat, image_size, seed, goal_reward=goal_reward, goal_radius=radius,
                      render_mode=render_mode)
    if domain in ("walker", "quadruped"):
        from choreo.actors.envs.dmc import DMCEnv

        return DMCEnv(task, obs, action_repeat, image_size, seed, render_mode=render_mode)
    if domain == "jaco":
        from choreo.actors.envs.jaco import JacoEnv

        return JacoEnv(task, obs, action_repeat, image_size, seed, render_mode=render_mode)
    from choreo.actors.envs.metaworld_reach import MetaWorldReach

    return MetaWorldReach(task, obs, action_repeat, image_size, seed, goal_set=goal_set, goal_index=goal_index,
                          render_mode=render_mode)


def make_env_from_config(cfg: EnvConfig, seed: int) -> gymnasium.Env:
    """Build the environment an `EnvConfig` describes (its action repeat is used as given)."""
    return make_env(
        cfg.task,
        obs=cfg.obs,
        seed=seed,
        action_repeat=cfg.action_repeat,
        image_size=cfg.image_size,
        goal_set=cfg.goal_set,
        goal_index=cfg.goal_index,
        goal_reward=cfg.goal_reward,
        goal_radius=cfg.goal_radius,
        gym_kwargs=cfg.gym_kwargs,
    )


def env_shapes(cfg: EnvConfig) -> tuple[tuple[int, ...], int]:
    """The observation shape and action size of the environment `cfg` describes (one is built to
    read them)."""
    env = make_env_from_config(cfg, seed=0)
    try:
        return tuple(env.observation_space.shape), math.prod(env.action_space.shape)
    finally:
        env.close()


def physics_renderer(cfg: EnvConfig):
    """A function from simulator states [T, P] to the task's pixel observations [T, 3, S, S]
    uint8, rendered by one environment of `cfg` built for pixels (kept for every call): how pixel
    runs load a state dataset whose episodes carry ExORL's `physics`."""
    import dataclasses

    env = make_env_from_config(dataclasses.replace(cfg, obs="pixels"), seed=0)
    if getattr(env.unwrapped, "physics", None) is None:
        env.close()
        raise ValueError(f"env.task {cfg.task!r} cannot render stored physics states (only the dm_control "
                         f"tasks can): use a dataset with pixel observations")
    return env.unwrapped.render_states


def metaworld_goals(goal_set: int) -> np.ndarray:
    """The 50 Meta-World reach goals [50, 3] of goal set `goal_set` (its integer seed)."""
    from choreo.actors.envs.metaworld_reach import metaworld_goals as goals

    return goals(goal_set)


def _registered_entry(**kwargs) -> gymnasium.Env:
    return make_env(**kwargs)


# gymnasium.make reads the render modes from the entry point before it makes an environment: with
# them it serves "rgb_array_list" (RenderCollection over "rgb_array") and "human" (HumanRendering).
_registered_entry.metadata = {"render_modes": list(RENDER_MODES)}  # type: ignore[attr-defined]


def register_envs() -> None:
    """Register every built-in id with gymnasium as `choreo/<id>` (idempotent)."""
    for task in ENV_IDS:
        name = REGISTRY_PREFIX + task
        if name in gymnasium.registry:
            continue
        gymnasium.register(
            id=name,
            entry_point=_registered_entry,
            kwargs={"task": task},
            disable_env_checker=task in METAWORLD_IDS,
        )


register_envs()

__all__ = [
    "ENV_IDS", "EnvSpec", "GOAL_REWARDS", "GYM_PREFIX", "METAWORLD_IDS", "NAV_IDS", "OBS_KINDS", "RENDER_MODES",
    "URLB_IDS",
    "env_spec", "is_gym_id", "make_env", "make_env_from_config", "metaworld_goals", "normalised_distance",
    "register_envs",
]  # fmt: skip
