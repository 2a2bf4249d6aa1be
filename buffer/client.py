"""Client of the sharded replay service: routes chunks to shards and draws batches across shards.
No Ray here: `launch/` passes Ray-aware `call` and `gather`. The rate limiter is not the client's:
the run core owns it and decides when batches are drawn.

Routing (`route`). Everything environment worker w writes goes to shard `w % num_shards`, always
the same one, so the chunks of an episode stay together and windows never need two shards. Workers
are numbered densely from 0, so the modulo spreads them evenly. Workers send their chunks to their
shard directly (through the object store on Ray); the client only reads.

Sampling. A batch of B rows draws per-shard row counts from a multinomial in proportion to the
shards' sizes (steps held; a shard without a valid window of the length weighs 0), asks each
shard for its rows with a seed drawn from the client's generator, and scatters the rows into the
batch in a random order (deterministic given the seed and the same shard contents). Sizes come
from one `sample_info` call per shard, cached for `refresh_every` batches (and refreshed at once
when the cache says nothing can be sampled), so a batch costs one round trip per shard used.

Positions. The n-th batch is drawn with a generator of its own, seeded by (seed, n), where n is
`position` (batches drawn so far). A learner that resumes from a checkpoint sets `position` to the
batches it had trained on, so that it draws the batches it would have drawn next had it not
stopped (exactly those when the replay holds the same steps, as an offline run's does), and not
the run's first batches again. Batches drawn ahead but not trained on are drawn again.

Failures. If a shard's call raises (its process died, or its cached size was stale and it holds no
window), its rows are redrawn from the other shards, the shard weighs 0 until the next refresh,
and the failure is counted in `stats()`; batches keep coming while any shard can serve. Only if no
shard can serve does `sample` raise (all failed) or return None (nothing to sample yet).

`call(shard, method_name, *args)` returns a result or a future, `gather(list)` resolves a list of
them; the defaults call the methods directly (local mode). With Ray:
    ReplayClient(handles, seed, call=lambda s, m, *a: getattr(s, m).remote(*a), gather=ray.get)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from choreo.buffer.shard import ReplayEmptyError


def route(worker: int, num_shards: int) -> int:
    """The shard that holds everything environment worker `worker` writes."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards!r}")
    return int(worker) % num_shards


def _direct_call(shard: Any, method: str, *args: Any) -> Any:
    return getattr(shard, method)(*args)


def _identity_gather(items: list) -> list:
    return list(items)


class ReplayClient:
    """Samples batches over all shards."""

    def __init__(self, shards: Sequence[Any], seed: int, call: Callable[..., Any] | None = None,
                 gather: Callable[[list], list] | None = None, refresh_every: int = 10) -> None:
        if not shards:
            raise ValueError("shards must hold at least one shard")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every!r}")
        self.shards = list(shards)
        self.call = call or _direct_call
        self.gather = gather or _identity_gather
        self.refresh_every = int(refresh_every)
        self.seed = int(seed)
        self.position = 0
        """Batches drawn so far: the next one is drawn with the generator seeded by (seed, position)."""
        self._rng = np.random.default_rng([self.seed, self.position])
        n = len(self.shards)
        self._weights = np.zeros(n)
        self._cached_length: int | None = None
        self._since_refresh = 0
        self._counters = {"samples": 0, "refreshes": 0, "failures": 0}
        self._rows = [0] * n
        self._shard_failures = [0] * n
        self._shard_empty = [0] * n
        self.last_errors: list[str | None] = [None] * n
        """The last error message of each shard (None if it never failed)."""

    # ------------------------------------------------------------------------- sizes

    def refresh(self, length: int) -> np.ndarray:
        """Asks every shard for its size and windows of `length`; returns the sampling weights.
        Raises RuntimeError if every shard's call failed."""
        futures = []
        for i, shard in enumerate(self.shards):
            try:
                futures.append(self.call(shard, "sample_info", length))
            except Exception as exc:  # noqa: BLE001 - a failing shard must not stop the others
                futures.append(exc)
        weights = np.zeros(len(self.shards))
        failed = 0
        for i, fut in enumerate(futures):
            try:
                if isinstance(fut, Exception):
                    raise fut
                info = self.gather([fut])[0]
            except Exception as exc:  # noqa: BLE001
                self._fail(i, exc)
                failed += 1
                continue
            weights[i] = float(info["steps"]) if info["windows"] > 0 else 0.0
        if failed == len(self.shards):
            self._weights[:] = 0.0
            raise RuntimeError(f"no replay shard could serve a batch ({self._errors()})")
        self._weights, self._cached_length, self._since_refresh = weights, length, 0
        self._counters["refreshes"] += 1
        return weights.copy()

    def _fail(self, i: int, exc: BaseException) -> None:
        self._weights[i] = 0.0
        self.last_errors[i] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ReplayEmptyError):
            self._shard_empty[i] += 1
        else:
            self._shard_failures[i] += 1
            self._counters["failures"] += 1

    def _errors(self) -> str:
        return "; ".join(f"shard {i}: {e}" for i, e in enumerate(self.last_errors) if e) or "all empty"

    def _current_weights(self, length: int) -> np.ndarray:
        if (self._cached_length != length or self._since_refresh >= self.refresh_every
                or self._weights.sum() <= 0):
            self.refresh(length)
        return self._weights

    # ------------------------------------------------------------------------- sample

    def sample(self, batch: int, length: int) -> dict[str, np.ndarray] | None:
        """A batch `{key: [batch, length, ...]}` drawn across shards, or None if no shard holds a
        valid window yet. Raises RuntimeError if every shard that should serve failed."""
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be >= 1, got {batch} and {length}")
        if self._current_weights(length).sum() <= 0:
            return None
        self._rng = np.random.default_rng([self.seed, self.position])
        parts = self._draw(batch, length)
        self._since_refresh += 1
        self._counters["samples"] += 1
        out = self._assemble(parts, batch)
        self.position += 1
        return out

    def _draw(self, batch: int, length: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        parts: list[tuple[int, dict[str, np.ndarray]]] = []
        missing = batch
        while missing:
            weights = self._weights
            total = weights.sum()
            if total <= 0:
                raise RuntimeError(f"no replay shard could serve a batch ({self._errors()})")
            counts = self._rng.multinomial(missing, weights / total)
            calls = []
            for i in np.flatnonzero(counts).tolist():
                seed = int(self._rng.integers(2**63))
                try:
                    calls.append((i, self.call(self.shards[i], "sample", int(counts[i]), length, seed)))
                except Exception as exc:  # noqa: BLE001
                    calls.append((i, exc))
            for i, fut in calls:
                try:
                    if isinstance(fut, Exception):
                        raise fut
                    rows = self.gather([fut])[0]
                except Exception as exc:  # noqa: BLE001 - redraw these rows from the other shards
                    self._fail(i, exc)
                    continue
                parts.append((i, rows))
                self._rows[i] += int(counts[i])
                missing -= int(counts[i])
        return parts

    def _assemble(self, parts: list[tuple[int, dict[str, np.ndarray]]], batch: int) -> dict[str, np.ndarray]:
        if len(parts) == 1:
            return parts[0][1]  # a shard's rows are already in random order
        order = self._rng.permutation(batch)
        out = {}
        for key, first in parts[0][1].items():
            arr = np.empty((batch, *first.shape[1:]), first.dtype)
            at = 0
            for _, rows in parts:
                n = len(rows[key])
                arr[order[at:at + n]] = rows[key]
                at += n
            out[key] = arr
        return out

    # ------------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Client counters: samples, size refreshes, failures (total and per shard),
        stale-size refusals per shard, rows drawn per shard, and the current sampling weights."""
        return {**self._counters, "shard_failures": list(self._shard_failures),
                "shard_empty": list(self._shard_empty), "shard_rows": list(self._rows),
                "weights": self._weights.tolist()}

    def shard_stats(self) -> list[dict[str, Any] | None]:
        """Each shard's `stats()` (None for a shard whose call failed)."""
        out = []
        for i, shard in enumerate(self.shards):
            try:
                out.append(self.gather([self.call(shard, "stats")])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(None)
                self.last_errors[i] = f"{type(exc).__name__}: {exc}"
        return out
