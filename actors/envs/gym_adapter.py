"""`gym:<id>`: any installed gymnasium environment with a Box action space (`gym:<module>:<id>` imports
`<module>` first, for environments a user module registers), behind the same
interface as the built-in tasks (actions in [-1, 1], action repeat, flat float32 states or
uint8 [3, S, S] pixels from `render()`).

Keyword arguments for `gymnasium.make` come from `EnvConfig.gym_kwargs`, entries `name=value` with
the value read as YAML (`true`, `3`, `0.5`, `[1, 2]`, text), e.g. DADS's x-y prior on Ant:
`env.task=gym:Ant-v5 env.gym_kwargs=[exclude_current_positions_from_observation=false]` puts the
torso's x, y first in the observation. `render_mode`, `width` and `height` cannot be among them:
they follow `obs`, `render_mode` and `image_size`. The inner environment renders (`rgb_array`) for
pixels, and for `render()` of a states environment when its id declares `rgb_array` (otherwise
that environment's `render_mode` is None)."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # gymnasium's MuJoCo envs import mujoco

from collections.abc import Iterable, Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from choreo.actors.envs.base import ChoreoEnv, check_render_mode


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C] by nearest-neighbour sampling at pixel centres."""
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    rows = ((np.arange(size) + 0.5) * (h / size)).astype(np.intp)
    cols = ((np.arange(size) + 0.5) * (w / size)).astype(np.intp)
    return image[rows[:, None], cols[None, :]]


def import_gym_module(gym_id: str) -> str:
    """`module:EnvId` (gymnasium's convention for environments registered by a user's module):
    imports `module` so that it registers its environments; returns `EnvId`. Plain ids pass."""
    if ":" not in gym_id:
        return gym_id
    module, _, env_id = gym_id.partition(":")
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"gym:{gym_id}: cannot import module '{module}' ({exc})") from None
    return env_id


RESERVED_KWARGS = ("render_mode", "width", "height")


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as text
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_gym_kwargs(entries: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`name=value` entries (values read as YAML) -> keyword arguments for `gymnasium.make`; a
    mapping passes as it is. Raises ValueError naming a malformed, repeated or reserved entry."""
    if not entries:
        return {}
    if isinstance(entries, Mapping):
        out = dict(entries)
    else:
        if isinstance(entries, str):
            entries = [entries]
        out = {}
        for entry in entries:
            name, sep, text = str(entry).partition("=")
            name = name.strip()
            if not sep or not name.isidentifier():
                raise ValueError(f"gym_kwargs entry {entry!r} is not name=value")
            if name in out:
                raise ValueError(f"gym_kwargs: {name!r} is given twice")
            out[name] = _yaml_value(text.strip())
    reserved = [name for name in out if name in RESERVED_KWARGS]
    if reserved:
        raise ValueError(f"gym_kwargs: {', '.join(reserved)} set by obs and image_size; do not give them")
    return out


def declared_render_modes(gym_id: str) -> list[str]:
    """The render modes a registered gymnasium id declares before it is made (its entry point's
    metadata, as `gymnasium.make` reads them)."""
    from gymnasium.envs.registration import load_env_creator

    entry = gymnasium.spec(gym_id).entry_point
    creator = entry if callable(entry) else load_env_creator(entry)
    metadata = getattr(creator, "metadata", None)
    return list(metadata.get("render_modes") or []) if isinstance(metadata, dict) else []


def _make_inner(gym_id: str, pixels: bool, image_size: int, kwargs: Mapping[str, Any] | None = None,
                render: bool = False) -> tuple[gymnasium.Env, bool]:
    """The gymnasium environment, and whether it renders: always for pixels; for `render` when
    the id declares "rgb_array" (a states environment that cannot render is still made)."""
    kwargs = dict(kwargs or {})
    gym_id = import_gym_module(gym_id)
    if gym_id not in gymnasium.registry:
        import difflib

        close = difflib.get_close_matches(gym_id, list(gymnasium.registry), n=3)
        hint = f"; did you mean {', '.join('gym:' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown gymnasium environment 'gym:{gym_id}'{hint}")
    renders = pixels or (render and "rgb_array" in declared_render_modes(gym_id))
    return _make(gym_id, renders, image_size, kwargs), renders


def _make(gym_id: str, renders: bool, image_size: int, kwargs: dict[str, Any]) -> gymnasium.Env:
    try:
        if not renders:
            return gymnasium.make(gym_id, **kwargs)
        try:  # MuJoCo-based envs take the image size directly: no large render to shrink
            return gymnasium.make(gym_id, render_mode="rgb_array", width=image_size, height=image_size, **kwargs)
        except TypeError:
            return gymnasium.make(gym_id, render_mode="rgb_array", **kwargs)
    except TypeError as exc:
        if not kwargs:
            raise
        raise ValueError(f"gym:{gym_id} does not take keyword arguments {kwargs}: {exc}") from None


class GymEnv(ChoreoEnv):
    def __init__(
        self,
        task: str,
        obs: str,
        action_repeat: int,
        image_size: int,
        seed: int | None,
        gym_kwargs: Iterable[str] | Mapping[str, Any] | None = None,
        gym_id: str | None = None,
        render_mode: str | None = "rgb_array",
    ) -> None:
        """gym_kwargs: for `gymnasium.make` (see `parse_gym_kwargs`); gym_id: the gymnasium id
        (default: `task` without its `gym:` prefix; built-in tasks wrapping one name it);
        render_mode: "rgb_array" (kept only where the inner environment can render) or None."""
        check_render_mode(render_mode)
        if gym_id is None:
            gym_id = task[len("gym:"):]
        inner, renders = _make_inner(gym_id, obs == "pixels", image_size, parse_gym_kwargs(gym_kwargs),
                                     render=render_mode is not None)
        if not isinstance(inner.action_space, spaces.Box):
            space = inner.action_space
            inner.close()
            raise ValueError(
                f"{task}: action space {space} is not a Box; only continuous (Box) action spaces are supported"
            )
        self._inner = inner
        obs_space = inner.observation_space
        self._flat_box = isinstance(obs_space, spaces.Box)
        self._obs_space = obs_space
        state_dim = int(np.prod(obs_space.shape)) if self._flat_box else int(spaces.flatdim(obs_space))
        limit = inner.spec.max_episode_steps if inner.spec is not None else None
        model = getattr(inner.unwrapped, "model", None)
        if model is not None and hasattr(model, "vis"):  # MuJoCo: fast software renders
            model.vis.quality.shadowsize = 0
            model.vis.quality.offsamples = 0
        self._last_obs: Any = None
        low, high = inner.action_space.low, inner.action_space.high
        self._action_dtype = inner.action_space.dtype
        super().__init__(task, obs, action_repeat, image_size, low.ravel(), high.ravel(), limit, state_dim, seed,
                         render_mode=render_mode if renders else None, frame_seconds=_frame_seconds(inner))
        self._action_shape = inner.action_space.shape
        inner.action_space.seed(seed)

    @property
    def inner(self) -> gymnasium.Env:
        return self._inner

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        self._last_obs, info = self._inner.reset(seed=seed)
        return info

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        a = action.reshape(self._action_shape).astype(self._action_dtype, copy=False)
        obs, reward, terminated, truncated, _info = self._inner.step(a)
        self._last_obs = obs
        self._frame_truncated = bool(truncated)
        return float(reward), bool(terminated), 0.0

    def _state_obs(self) -> np.ndarray:
        if self._flat_box:
            return np.asarray(self._last_obs, np.float32).reshape(-1)
        return np.asarray(spaces.flatten(self._obs_space, self._last_obs), np.float32)

    def _render_frame(self) -> np.ndarray:
        frame = self._inner.render()
        if frame is None:
            raise RuntimeError(f"{self.task_id}: render() returned no image")
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] < 3:
            raise RuntimeError(f"{self.task_id}: render() returned shape {frame.shape}, expected [H, W, 3]")
        return np.ascontiguousarray(resize_nearest(frame[..., :3], self.image_size), dtype=np.uint8)

    def close(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.close()
            self._inner = None


def _frame_seconds(env: gymnasium.Env) -> float | None:
    """Simulated seconds of one step of a gymnasium environment: MuJoCo's `dt`, else 1 / its
    declared `render_fps`, else None."""
    dt = getattr(env.unwrapped, "dt", None)
    if isinstance(dt, (int, float)) and dt > 0:
        return float(dt)
    fps = env.metadata.get("render_fps")
    return 1.0 / fps if isinstance(fps, (int, float)) and fps > 0 else None


def gym_episode_frames(gym_id: str) -> int | None:
    """The registered time limit of a gymnasium id, in its own steps."""
    return gymnasium.spec(gym_id).max_episode_steps

