"""Uniform random actions behind the acting-policy interface: the baseline that zero-shot
evaluation compares the pretrained skills against (the paper's Table 1)."""

from __future__ import annotations

from typing import Any

import numpy as np


class UniformRandomPolicy:
    """Actions uniform in [-1, 1]^A, independent of the observation; no weights to load."""

    def __init__(self, action_dim: int, seed: int) -> None:
        self.action_dim = action_dim
        self.rng = np.random.default_rng(seed)
        self.version = -1

    def initial_state(self, n: int) -> None:
        return None

    def act(self, observation: np.ndarray, is_first: np.ndarray, state: Any,
            mode: str = "sample") -> tuple[np.ndarray, Any, dict[str, np.ndarray]]:
        n = len(observation)
        action = self.rng.uniform(-1.0, 1.0, (n, self.action_dim)).astype(np.float32)
        return action, state, {"skill": np.full(n, -1, np.int32)}

    def load_weights(self, arrays: dict, version: int) -> None:
        self.version = int(version)  # nothing to load: random actions need no weights
