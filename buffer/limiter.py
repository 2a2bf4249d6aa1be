"""Rate limiter: holds the ratio of sampled steps to inserted steps near `samples_per_insert`.

Pure bookkeeping behind a lock: it answers "may I?" and counts; it never sleeps. One owner holds it
(the run core, `launch/runtime/core.py`), asks before it dispatches work and records how long each side
waited with `record_wait`.

Rules, with I = steps inserted beyond min_size (the warm-up is not counted), S = steps sampled
(trained on), Ri / Rs = steps reserved for inserting / sampling (below), t = samples_per_insert,
e = tolerance:
- sample n steps:  allowed iff min_size steps are in and (t == 0 or S + Rs + n <= t * (1 + e) * I).
- insert m steps:  allowed iff fewer than min_size steps are in or reserved, or t == 0,
                   or S >= t * (1 - e) * (I + Ri + m), or nothing is in flight and the learner
                   could not sample either (below).
Not counting the warm-up means training starts at the target rate right after it (the reference
trains once every 10 frames from the end of its 4000 seed frames on), instead of in a burst that
would first sample the warm-up steps t times over, as a ratio over all inserts would demand.

Work in flight. Where inserting and sampling take time (a worker's call that collects a chunk, a
learner that takes seconds per update), the caller reserves the steps before the work starts
(`reserve_insert`, `reserve_sample`) and completes them when it is done (`complete_insert`,
`complete_sample`, which count them, or give them back when the work was lost). Reserved steps
count against the bound they could break: reserved samples against the upper bound, reserved
inserts against the lower one. Only completed steps enter the ratio, so it measures what was
trained on, not what was promised, whatever an update costs: many workers or a learner with
batches in its queue cannot run past the band. `on_insert` / `on_sample` count work that is done
at once (reserve and complete in one call).

No deadlock. With a narrow band (e = 0) or a batch larger than the band's width, a state could
exist where neither side may proceed: sampling would overshoot the upper bound while inserting
would undershoot the lower one. The limiter remembers the learner's demand (the step count of the
last `can_sample` / `reserve_sample`) and, when nothing is in flight on either side, `can_insert`
returns True whenever `can_sample(demand)` is False. Hence at every moment either some work is in
flight (and its completion moves the counters), or at least one of `can_sample(demand)` and
`can_insert(m)` is True: if the actors are held back, the learner is allowed to sample, and each
sample raises S until inserts are allowed again. Before the learner has asked for anything, its
demand counts as one step (its first refused request records the real demand).
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
        self._insert_reserved = 0  # steps being inserted (a worker's call in flight)
        self._sample_reserved = 0  # steps granted to the learner and not yet trained on
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
        high = self.samples_per_insert * (1 + self.tolerance) * self._counted()
        return self._sampled + self._sample_reserved + steps <= high

    def can_sample(self, steps: int) -> bool:
        """Whether the learner may sample `steps` steps now (records `steps` as its demand)."""
        steps = _steps("steps", steps)
        with self._lock:
            self._demand = max(steps, 1)
            return self._sample_ok(steps)

    def _insert_ok(self, steps: int) -> bool:
        if self._inserted + self._insert_reserved < self.min_size or self.samples_per_insert == 0:
            return True
        low = self.samples_per_insert * (1 - self.tolerance) * self._counted(self._insert_reserved + steps)
        if self._sampled >= low:
            return True
        if self._insert_reserved or self._sample_reserved:
            return False  # work in flight will move the counters
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

    def reserve_insert(self, steps: int) -> bool:
        """Reserves `steps` steps about to be inserted if `can_insert` allows it; True if reserved.
        Complete them with `complete_insert`."""
        steps = _steps("steps", steps)
        with self._lock:
            if not self._insert_ok(steps):
                return False
            self._insert_reserved += steps
            return True

    def complete_insert(self, steps: int, inserted: bool = True) -> None:
        """Ends a reservation of `steps` inserted steps: counts them, or (inserted=False, the work
        was lost) only gives the reservation back."""
        steps = _steps("steps", steps)
        with self._lock:
            if steps > self._insert_reserved:
                raise ValueError(f"completing {steps} insert steps, but only {self._insert_reserved} are reserved")
            self._insert_reserved -= steps
            if inserted:
                self._inserted += steps

    def reserve_sample(self, steps: int) -> bool:
        """Reserves `steps` steps for the learner (a granted batch) if `can_sample` allows it;
        True if reserved. Complete them with `complete_sample` once trained on."""
        steps = _steps("steps", steps)
        with self._lock:
            self._demand = max(steps, 1)
            if not self._sample_ok(steps):
                return False
            self._sample_reserved += steps
            return True

    def complete_sample(self, steps: int, trained: bool = True) -> None:
        """Ends a reservation of `steps` sampled steps: counts them, or (trained=False: the learner
        holding them died) only gives the reservation back."""
        steps = _steps("steps", steps)
        with self._lock:
            if steps > self._sample_reserved:
                raise ValueError(f"completing {steps} sample steps, but only {self._sample_reserved} are reserved")
            self._sample_reserved -= steps
            if trained:
                self._sampled += steps

    def forget_samples(self, steps: int) -> None:
        """Uncounts `steps` sampled steps whose training was lost (a learner that died is replaced
        from its checkpoint and redoes the updates made since)."""
        steps = _steps("steps", steps)
        with self._lock:
            self._sampled = max(self._sampled - steps, 0)

    @property
    def reserved(self) -> tuple[int, int]:
        """Steps in flight: (being inserted, granted to the learner and not trained on)."""
        with self._lock:
            return self._insert_reserved, self._sample_reserved

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
        """Counters and wait totals, flat: inserted, sampled, ratio, the steps reserved on each side,
        {insert,sample}_wait_{s,count}."""
        with self._lock:
            return {"inserted": self._inserted, "sampled": self._sampled,
                    "insert_reserved": self._insert_reserved, "sample_reserved": self._sample_reserved,
                    "ratio": self._sampled / self._counted() if self._counted() else 0.0,
                    "insert_wait_s": self._wait_s["insert"], "insert_wait_count": self._wait_n["insert"],
                    "sample_wait_s": self._wait_s["sample"], "sample_wait_count": self._wait_n["sample"]}

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain values (msgpack- and torch.load(weights_only=True)-safe) to resume the counters.
        Reservations are not saved: the work in flight does not survive the process."""
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
