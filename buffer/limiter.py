"""Rate limiter: holds the ratio of sampled steps to inserted steps near `samples_per_insert`.

Pure bookkeeping behind a lock: it answers "may I?" and counts; it never sleeps. Callers poll
(`ReplayClient` does, and records how long it waited with `record_wait`).

Rules, with I = steps inserted beyond min_size (the warm-up is not counted), S = steps sampled,
t = samples_per_insert, e = tolerance:
- sample n steps:  allowed iff min_size steps are in and (t == 0 or (S + n) <= t * (1 + e) * I).
- insert m steps:  allowed iff fewer than min_size steps are in, or t == 0,
                   or S >= t * (1 - e) * (I + m), or the learner could not sample either (below).
Not counting the warm-up means training starts at the target rate right after it (the reference
trains once every 10 frames from the end of its 4000 seed frames on), instead of in a burst that
would first sample the warm-up steps t times over, as a ratio over all inserts would demand.

No deadlock. With a narrow band (e = 0) or a batch larger than the band's width, a state could
exist where neither side may proceed: sampling would overshoot the upper bound while inserting
would undershoot the lower one. The limiter remembers the learner's demand (the step count of the
last `can_sample` / `on_sample`) and `can_insert` returns True whenever `can_sample(demand)` is
False. Hence at every moment at least one of `can_sample(demand)` and `can_insert(m)` is True:
if the actors are held back, the learner is allowed to sample, and each sample raises S until
inserts are allowed again. Before the learner has asked for anything, its demand counts as one
step (its first refused request records the real demand).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

_SIDES = ("insert", "sample")


class RateLimiter:
    """Sampled/inserted step ratio held within `samples_per_insert * (1 -/+ tolerance)`.

    `samples_per_insert == 0` disables the ratio: both sides are always allowed once `min_size`
    steps were inserted (inserts are always allowed). Thread-safe: every method takes one lock.
    """

    def __init__(self, samples_per_insert: float, tolerance: float, min_size: int) -> None:
        for name, value in (("samples_per_insert", samples_per_insert), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
        self.samples_per_insert = float(samples_per_insert)
        self.tolerance = float(tolerance)
        self.min_size = int(min_size)
        self._lock = threading.Lock()
        self._inserted = 0
        self._sampled = 0
        self._demand = 1
        self._wait_s = dict.fromkeys(_SIDES, 0.0)
        self._wait_n = dict.fromkeys(_SIDES, 0)

    # ------------------------------------------------------------------------- queries

    def _counted(self, extra: int = 0) -> int:
        """Inserted steps beyond the warm-up (what the ratio is over)."""
        return max(self._inserted + extra - self.min_size, 0)

    def _sample_ok(self, steps: int) -> bool:
        if self._inserted < self.min_size or self._inserted == 0:
            return False
        if self.samples_per_insert == 0:
            return True
        return (self._sampled + steps) <= self.samples_per_insert * (1 + self.tolerance) * self._counted()

    def can_sample(self, steps: int) -> bool:
        """Whether the learner may sample `steps` steps now (records `steps` as its demand)."""
        steps = _steps("steps", steps)
        with self._lock:
            self._demand = max(steps, 1)
            return self._sample_ok(steps)

    def _insert_ok(self, steps: int) -> bool:
        if self._inserted < self.min_size or self.samples_per_insert == 0:
            return True
        low = self.samples_per_insert * (1 - self.tolerance) * self._counted(steps)
        if self._sampled >= low:
            return True
        return not self._sample_ok(self._demand)  # never both refused: see the module docstring

    def can_insert(self, steps: int) -> bool:
        """Whether an actor may insert `steps` steps now."""
        steps = _steps("steps", steps)
        with self._lock:
            return self._insert_ok(steps)

    # ------------------------------------------------------------------------- counting

    def on_insert(self, steps: int) -> None:
        """Counts `steps` inserted steps."""
        steps = _steps("steps", steps)
        with self._lock:
            self._inserted += steps

    def on_sample(self, steps: int) -> None:
        """Counts `steps` sampled steps (a batch of B x T counts B * T)."""
        steps = _steps("steps", steps)
        with self._lock:
            self._sampled += steps
            self._demand = max(steps, 1)

    def try_insert(self, steps: int) -> bool:
        """`can_insert` and `on_insert` under one lock hold; True if the steps were counted."""
        steps = _steps("steps", steps)
        with self._lock:
            if not self._insert_ok(steps):
                return False
            self._inserted += steps
            return True

    def try_sample(self, steps: int) -> bool:
        """`can_sample` and `on_sample` under one lock hold; True if the steps were counted."""
        steps = _steps("steps", steps)
        with self._lock:
            self._demand = max(steps, 1)
            if not self._sample_ok(steps):
                return False
            self._sampled += steps
            return True

    def ratio(self) -> float:
        """Sampled steps per inserted step beyond the warm-up (0 before any)."""
        with self._lock:
            counted = self._counted()
            return self._sampled / counted if counted else 0.0

    def record_wait(self, side: str, seconds: float) -> None:
        """Adds one wait of `seconds` by side "insert" (actors) or "sample" (learner)."""
        if side not in _SIDES:
            raise ValueError(f"side must be 'insert' or 'sample', got {side!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        with self._lock:
            self._wait_s[side] += float(seconds)
            self._wait_n[side] += 1

    def stats(self) -> dict[str, float]:
        """Counters and wait totals, flat: inserted, sampled, ratio, {insert,sample}_wait_{s,count}."""
        with self._lock:
            return {"inserted": self._inserted, "sampled": self._sampled,
                    "ratio": self._sampled / self._counted() if self._counted() else 0.0,
                    "insert_wait_s": self._wait_s["insert"], "insert_wait_count": self._wait_n["insert"],
                    "sample_wait_s": self._wait_s["sample"], "sample_wait_count": self._wait_n["sample"]}

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain values (msgpack- and torch.load(weights_only=True)-safe) to resume the counters."""
        with self._lock:
            return {"inserted": self._inserted, "sampled": self._sampled, "demand": self._demand,
                    "wait_s": dict(self._wait_s), "wait_count": dict(self._wait_n),
                    "samples_per_insert": self.samples_per_insert, "tolerance": self.tolerance,
                    "min_size": self.min_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the counters of `state_dict()`. The settings stay those of the constructor
        (a resumed run may change them; the counters still mean the same)."""
        if not isinstance(state, dict):
            raise ValueError(f"limiter state must be a dict, got {type(state).__name__}")
        try:
            inserted = _steps("inserted", state["inserted"])
            sampled = _steps("sampled", state["sampled"])
            demand = max(_steps("demand", state.get("demand", 1)), 1)
            wait_s = {side: float(state["wait_s"][side]) for side in _SIDES}
            wait_n = {side: _steps("wait_count", state["wait_count"][side]) for side in _SIDES}
        except KeyError as exc:
            raise ValueError(f"limiter state lacks {exc}") from None
        with self._lock:
            self._inserted, self._sampled, self._demand = inserted, sampled, demand
            self._wait_s, self._wait_n = wait_s, wait_n


def _steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)
