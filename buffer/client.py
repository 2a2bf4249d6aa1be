"""Client of the sharded replay service: routes chunks to shards, draws batches across shards, and
applies the rate limiter. No Ray here: `launch/` passes Ray-aware `call` and `gather`.

Routing. Stream s goes to shard `s % len(shards)` (`shard_for`), always the same one, so the chunks
of an episode stay together and windows never need two shards. Stream ids are assigned densely by
`launch/` (actor index x envs per actor + env index), so the modulo spreads them evenly.

Sampling. A batch of B rows draws per-shard row counts from a multinomial in proportion to the
shards' sizes (steps held; a shard without a valid window of the length weighs 0), asks each
shard for its rows with a seed drawn from the client's generator, and scatters the rows into the
batch in a random order (deterministic given the seed and the same shard contents). Sizes come
from one `sample_info` call per shard, cached for `refresh_every` batches (and refreshed at once
when the cache says nothing can be sampled), so a batch costs one round trip per shard used.

Failures. If a shard's call raises (its process died, or its cached size was stale and it holds no
window), its rows are redrawn from the other shards, the shard weighs 0 until the next refresh,
and the failure is counted in `stats()`; batches keep coming while any shard can serve. Only if no
shard can serve does `sample` raise (all failed) or return None (nothing to sample yet).

`call(shard, method_name, *args)` returns a result or a future, `gather(list)` resolves a list of
them; the defaults call the methods directly (local mode). With Ray:
    ReplayClient(handles, limiter, seed, call=lambda s, m, *a: getattr(s, m).remote(*a), gather=ray.get)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from choreo import vocabulary as B
from choreo.buffer.codec import decode
from choreo.buffer.limiter import RateLimiter
from choreo.buffer.shard import ReplayEmptyError


def _direct_call(shard: Any, method: str, *args: Any) -> Any:
    return getattr(shard, method)(*args)


def _identity_gather(items: list) -> list:
    return list(items)


class ReplayClient:
    """Routes `add` to one shard per stream and samples batches over all shards."""

    def __init__(self, shards: Sequence[Any], limiter: RateLimiter | None, seed: int,
                 call: Callable[..., Any] | None = None, gather: Callable[[list], list] | None = None,
                 refresh_every: int = 10, poll_s: float = 0.002) -> None:
        if not shards:
            raise ValueError("shards must hold at least one shard")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every!r}")
        self.shards = list(shards)
        self.limiter = limiter
        self.call = call or _direct_call
        self.gather = gather or _identity_gather
        self.refresh_every = int(refresh_every)
        self.poll_s = float(poll_s)
        self._rng = np.random.default_rng(seed)
        n = len(self.shards)
        self._weights = np.zeros(n)
        self._cached_length: int | None = None
        self._since_refresh = 0
        self._counters = {"inserts": 0, "steps_inserted": 0, "samples": 0, "refreshes": 0, "failures": 0}
        self._rows = [0] * n
        self._shard_failures = [0] * n
        self._shard_empty = [0] * n
        self.last_errors: list[str | None] = [None] * n
        """The last error message of each shard (None if it never failed)."""

    # ------------------------------------------------------------------------- routing / add

    def shard_for(self, stream: int) -> int:
        """Index of the shard that holds `stream`: stream % number of shards."""
        return int(stream) % len(self.shards)

    def add(self, chunk: dict[str, np.ndarray] | bytes, stream: int, timeout: float | None = None) -> bool:
        """Adds `chunk` of `stream` to its shard; True once added.

        With a limiter, first waits (polling, no busy loop) until it allows the insert; returns
        False without adding if `timeout` seconds passed first (None: wait as long as it takes,
        which needs a learner sampling concurrently; a single-threaded caller should pass 0).
        Errors of the shard (a refused chunk) propagate.
        """
        arrays = decode(chunk)[0] if isinstance(chunk, (bytes, bytearray, memoryview)) else chunk
        if not isinstance(arrays, dict) or B.REWARD not in arrays:
            raise ValueError(f"chunk must be a dict of arrays with key {B.REWARD!r}")
        steps = len(arrays[B.REWARD])
        if self.limiter is not None and not self._wait(lambda: self.limiter.can_insert(steps), "insert", timeout):
            return False
        shard = self.shards[self.shard_for(stream)]
        self.gather([self.call(shard, "add", chunk, stream)])
        if self.limiter is not None:
            self.limiter.on_insert(steps)
        self._counters["inserts"] += 1
        self._counters["steps_inserted"] += steps
        return True

    def _wait(self, allowed: Callable[[], bool], side: str, timeout: float | None) -> bool:
        """Polls `allowed` until True or `timeout`; a wait that took time is recorded in the limiter
        (a refused single attempt, timeout 0, is not: the caller decides how it waits)."""
        if allowed():
            return True
        start = time.monotonic()
        ok = False
        while timeout is None or time.monotonic() - start < timeout:
            time.sleep(self.poll_s)
            if allowed():
                ok = True
                break
        if self.limiter is not None and (timeout is None or timeout > 0):
            self.limiter.record_wait(side, time.monotonic() - start)
        return ok

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

    def sample(self, batch: int, length: int, timeout: float = 0.0) -> dict[str, np.ndarray] | None:
        """A batch `{key: [batch, length, ...]}` drawn across shards, or None if none is allowed yet.

        None when, within `timeout` seconds (0: one attempt), the limiter did not allow `batch *
        length` sampled steps or no shard held a valid window. Raises RuntimeError if every shard
        that should serve failed.
        """
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be >= 1, got {batch} and {length}")
        steps = batch * length

        def ready() -> bool:
            if self.limiter is not None and not self.limiter.can_sample(steps):
                return False
            return self._current_weights(length).sum() > 0

        if not self._wait(ready, "sample", timeout):
            return None
        parts = self._draw(batch, length)
        self._since_refresh += 1
        if self.limiter is not None:
            self.limiter.on_sample(steps)
        self._counters["samples"] += 1
        return self._assemble(parts, batch)

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
        """Client counters: inserts, samples, size refreshes, failures (total and per shard),
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
