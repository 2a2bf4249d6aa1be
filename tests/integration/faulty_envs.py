"""Gymnasium environments that fail on purpose, for the fault-tolerance tests. Imported by Ray
workers through the `gym:faulty_envs:<id>` task syntax (the driver's sys.path reaches them).

The failure is switched on by a marker file named in an environment variable, so a test decides
when it starts (and a restarted worker sees the same switch):
- `CrashOnce-v0`: raises RuntimeError at a step while `CHOREO_TEST_CRASH_MARKER` names a file that
  does not exist yet, creating it first (so exactly one worker process crashes, once).
- `CrashAlways-v0`: raises RuntimeError at every episode's 5th step.
- `NaNObs-v0`: observations are NaN while the file named by `CHOREO_TEST_NAN_MARKER` exists.
"""

from __future__ import annotations

import os

import gymnasium
import numpy as np
from gymnasium import spaces


class _Walk(gymnasium.Env):
    """A 4-d point pushed by a 2-d action; 50-step episodes."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._t = 0
        self._x = np.zeros(4, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._x = self.np_random.normal(size=4).astype(np.float32)
        return self._obs(), {}

    def step(self, action):
        self._t += 1
        self._fault()
        self._x[:2] += 0.1 * np.asarray(action, np.float32)
        self._x[2:] = 0.9 * self._x[2:] + 0.1 * self._x[:2]
        return self._obs(), float(-np.abs(self._x).sum()), False, self._t >= 50, {}

    def _obs(self) -> np.ndarray:
        return self._x.copy()

    def _fault(self) -> None:
        pass


class CrashOnce(_Walk):
    def _fault(self) -> None:
        marker = os.environ.get("CHOREO_TEST_CRASH_MARKER")
        if self._t == 20 and marker:
            try:  # created atomically: of workers that reach this step together, exactly one crashes
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            raise RuntimeError("simulated environment failure")


class CrashAlways(_Walk):
    def _fault(self) -> None:
        if self._t == 5:
            raise RuntimeError("simulated environment failure")


class NaNObs(_Walk):
    def _obs(self) -> np.ndarray:
        marker = os.environ.get("CHOREO_TEST_NAN_MARKER")
        if marker and os.path.exists(marker):
            return np.full(4, np.nan, np.float32)
        return self._x.copy()


for _name, _cls in (("CrashOnce-v0", CrashOnce), ("CrashAlways-v0", CrashAlways), ("NaNObs-v0", NaNObs)):
    if _name not in gymnasium.registry:
        gymnasium.register(_name, entry_point=_cls)
