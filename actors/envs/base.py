"""The common environment: scaled actions, action repeat, agent-step time limit, seeding.

Every built-in environment subclasses `ChoreoEnv` and fills in four hooks that work in native
units and single simulator frames; this class turns them into a `gymnasium.Env` with

- action space `Box(-1, 1, (A,), float32)`, clipped and scaled affinely to the native bounds;
- `action_repeat` frames per agent step, rewards summed over them;
- an episode length counted in agent steps: `truncated` is True on the last step, `terminated`
  only where the task really ends (never for the built-in tasks);
- float32 flat state vectors or uint8 channels-first `[3, S, S]` images;
- explicit seeding: the constructor seed drives the first episode, `reset(seed=...)` reseeds;
- gymnasium's rendering conventions: `render_mode="rgb_array"` (the default) and `render()` returns
  the current frame [S, S, 3] uint8 (the camera of the pixel observations), with
  `metadata["render_fps"]` the agent steps per simulated second, so that gymnasium's wrappers
  (RecordVideo, RenderCollection) and `check_env` work.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco / dm_control are imported anywhere

import math
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

OBS_KINDS = ("states", "pixels")
RENDER_MODES = ("rgb_array",)


def check_render_mode(render_mode: object) -> None:
    """Raise ValueError unless `render_mode` is one this package's environments take."""
    if render_mode is not None and render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be 'rgb_array' (render() returns the frame [H, W, 3] uint8) or None, "
                         f"got {render_mode!r}; through gymnasium.make, 'rgb_array_list' collects the frames")


def episode_steps(frames: int | None, action_repeat: int) -> int | None:
    """Agent steps that cover an episode of `frames` simulator frames (the last one may be partial)."""
    return None if frames is None else math.ceil(frames / action_repeat)


def channels_first(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> contiguous [3, H, W] uint8."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.uint8)


class ObsFlattener:
    """Writes the arrays of an observation dict into one float32 vector.

    The key order and slices are fixed from the first observation, so each call is one
    allocation plus one slice assignment per key.
    """

    def __init__(self, example: dict[str, Any], exclude: tuple[str, ...] = ()) -> None:
        self.keys: list[str] = []
        self.slices: list[slice] = []
        start = 0
        for key, value in example.items():
            if key in exclude:
                continue
            size = int(np.size(value))
            self.keys.append(key)
            self.slices.append(slice(start, start + size))
            start += size
        self.dim = start
        self._pairs = list(zip(self.keys, self.slices))

    def __call__(self, obs: dict[str, Any]) -> np.ndarray:
        out = np.empty(self.dim, np.float32)
        for key, sl in self._pairs:
            out[sl] = np.ravel(obs[key])
        return out


class ChoreoEnv(gymnasium.Env):
    """Base class; subclasses implement `_reset_sim`, `_frame`, `_state_obs` and `_render_frame`."""

    metadata = {"render_modes": list(RENDER_MODES)}
    has_success = False

    def __init__(
        self,
        task: str,
        obs: str,
        action_repeat: int,
        image_size: int,
        native_low: np.ndarray,
        native_high: np.ndarray,
        episode_frames: int | None,
        state_dim: int,
        seed: int | None,
        render_mode: str | None = "rgb_array",
        frame_seconds: float | None = None,
    ) -> None:
        """render_mode: "rgb_array" or None (`render()` draws the frame either way, only when called).
        frame_seconds: simulated seconds of one frame, for `metadata["render_fps"]` (None: not declared)."""
        if obs not in OBS_KINDS:
            raise ValueError(f"obs must be one of {OBS_KINDS}, got {obs!r}")
        check_render_mode(render_mode)
        self.task_id = task
        self.obs_kind = obs
        self.action_repeat = int(action_repeat)
        self.image_size = int(image_size)
        self.render_mode = render_mode
        # Per instance: the frame rate depends on the action repeat, and gymnasium's RenderCollection
        # appends to the render modes of the environment it wraps.
        self.metadata = {"render_modes": list(RENDER_MODES)}
        if frame_seconds:
            self.metadata["render_fps"] = 1.0 / (frame_seconds * self.action_repeat)
        low = np.asarray(native_low, np.float64)
        high = np.asarray(native_high, np.float64)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(f"{task}: action bounds must be finite to scale to [-1, 1], got {low} .. {high}")
        self._act_scale = (high - low) / 2.0
        self._act_offset = (high + low) / 2.0
        self.action_space = spaces.Box(-1.0, 1.0, (low.size,), np.float32, seed=seed)
        if obs == "states":
            self.observation_space = spaces.Box(-np.inf, np.inf, (state_dim,), np.float32, seed=seed)
        else:
            self.observation_space = spaces.Box(0, 255, (3, self.image_size, self.image_size), np.uint8, seed=seed)
        self.episode_frames = episode_frames
        self._max_episode_steps = episode_steps(episode_frames, self.action_repeat)
        self._init_seed = seed
        self._elapsed = 0
        self._needs_reset = True
        self._seeded_once = False
        self._pixels = obs == "pixels"
        # Set by `_frame` when a wrapped simulator ends the episode by its own time limit.
        self._frame_truncated = False

    # --------------------------------------------------------------------------- hooks

    def _reset_sim(self, seed: int | None) -> dict[str, Any]:
        """Start an episode; reseed the simulator's random state first when `seed` is not None.
        Returns extra info entries."""
        raise NotImplementedError

    def _frame(self, action: np.ndarray) -> tuple[float, bool, float]:
        """Advance one frame with a native action; returns (reward, terminated, success).
        May set `self._frame_truncated` when a wrapped simulator's own time limit ends the episode."""
        raise NotImplementedError

    def _state_obs(self) -> np.ndarray:
        """Current float32 state vector [D]."""
        raise NotImplementedError

    def _render_frame(self) -> np.ndarray:
        """Current image [S, S, 3] uint8, upright."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- gymnasium API

    @property
    def max_episode_steps(self) -> int | None:
        """Agent steps per episode (None: no time limit)."""
        return self._max_episode_steps

    def native_action(self, action: np.ndarray) -> np.ndarray:
        """Clip to [-1, 1] and map affinely onto the simulator's action bounds."""
        a = np.clip(np.asarray(action, np.float64).reshape(self._act_scale.shape), -1.0, 1.0)
        return a * self._act_scale + self._act_offset

    def _observe(self) -> np.ndarray:
        return channels_first(self._render_frame()) if self._pixels else self._state_obs()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and not self._seeded_once:
            seed = self._init_seed
        super().reset(seed=seed)
        self._seeded_once = True
        extra = self._reset_sim(seed)
        self._elapsed = 0
        self._frame_truncated = False
        self._needs_reset = False
        info: dict[str, Any] = dict(extra) if extra else {}
        if self.has_success:
            info["success"] = 0.0
        return self._observe(), info

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError(f"{self.task_id}: call reset() before step() (and after an episode ends)")
        native = self.native_action(action)
        total = 0.0
        success = 0.0
        terminated = False
        frame = self._frame
        for _ in range(self.action_repeat):
            reward, terminated, ok = frame(native)
            total += reward
            if ok > success:
                success = ok
            if terminated or self._frame_truncated:
                break
        self._elapsed += 1
        truncated = self._frame_truncated or (
            not terminated and self._max_episode_steps is not None and self._elapsed >= self._max_episode_steps
        )
        if terminated or truncated:
            self._needs_reset = True
        info = {"success": success} if self.has_success else {}
        return self._observe(), total, terminated, truncated, info

    def render(self) -> np.ndarray:
        """The current frame [S, S, 3] uint8 (the pixel observation before transposition), drawn
        when called."""
        return self._render_frame()

    def render_states(self, states: np.ndarray) -> np.ndarray:
        """Pixel observations [T, 3, S, S] uint8 of simulator states [T, P] (`physics.get_state()`
        rows, as ExORL stores them): how a state dataset becomes a pixel one. Leaves the
        environment in the last state; reset it before stepping again."""
        physics = getattr(self, "physics", None)
        if physics is None:
            raise ValueError(f"{self.task_id} has no MuJoCo physics to render stored states with")
        states = np.asarray(states, np.float64)
        size = physics.get_state().shape[0]
        if states.ndim != 2 or states.shape[1] != size:
            raise ValueError(f"physics states of shape {list(states.shape)}, but {self.task_id}'s state has size {size}")
        frames = np.empty((len(states), 3, self.image_size, self.image_size), np.uint8)
        for t, state in enumerate(states):
            with physics.reset_context():  # sets the state and recomputes positions for rendering
                physics.set_state(state)
            frames[t] = channels_first(self._render_frame())
        self._needs_reset = True
        return frames
