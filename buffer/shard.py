"""One replay shard: FIFO storage of environment steps and uniform sampling of fixed-length windows
that never cross an episode boundary.

Storage. One preallocated ring per batch key, `[capacity, ...]`, allocated when the first chunk
arrives (its keys, dtypes and trailing shapes become the shard's schema; later chunks must match).
Chunks are written at the ring's head, one after another whatever their stream; the held steps are
the `size` slots before the head. Eviction is FIFO by chunks: before a chunk of n steps is written,
the oldest chunks are dropped until n slots are free, so `capacity` is never exceeded.

Window index. Steps are grouped into RUNS: consecutive steps of one stream within one episode
(a run starts at an `is_first` step, after an `is_last` step, at the first step held of a stream,
or after a refused chunk of that stream, so it never joins steps across a gap). An episode that spans
several chunks of its stream is one run, even though those chunks lie apart in the ring. Each run
keeps the ring slots of its held steps in order (an int64 array with a moving front), and a numpy
array `held[run]` counts them. A window of `length` steps is valid exactly when it lies inside one
run, so a run of h held steps holds max(0, h - length + 1) windows, and
    uniform sampling = draw B integers below the total, `searchsorted` the per-run cumulative
    counts, slice the run's slot array, and gather every key with one fancy index [B, length].
Eviction pops the oldest chunk and advances the front of the runs it touched (O(pieces in the
chunk)); nothing is rebuilt. Runs live in a pool of integer ids (smallest free id reused first),
so a per-run count vector costs one numpy op per sample, whatever the number of steps held.

The first step of every sampled window has `is_first` set to True in the returned batch: the
learner's recurrent filter starts from its initial state at the first step of each sequence, so
the flag tells it to reset there (the stored data is unchanged).

Checkpoints are one msgpack file per shard (via `buffer.codec`, never pickle) behind a header with
the payload's length and CRC32, written to a temporary file and moved into place with os.replace.
"""

from __future__ import annotations

import heapq
import json
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from choreo import vocabulary as B
from choreo.vocabulary import write_failed
from choreo.buffer.codec import ALLOWED_DTYPES, CodecError, decode, encode

_FLAG_KEYS = (B.IS_FIRST, B.IS_LAST, B.IS_TERMINAL)
_FLOAT_KEYS = (B.REWARD, B.DISCOUNT)
_INT_KEYS = (B.SKILL, B.POLICY_VERSION)

_MAGIC = b"choreo-replay-shard\x00"
_HEADER = struct.Struct("<QI")  # payload length, CRC32 of the payload
CHECKPOINT_VERSION = 1
"""Layout version of a shard checkpoint's metadata."""


class ReplayEmptyError(RuntimeError):
    """No valid window of the requested length exists (yet) in the shard."""


class CheckpointMismatchError(ValueError):
    """A valid checkpoint that does not fit this shard (another capacity)."""


class _Run:
    """Ring slots of the held steps of one run, in stream order: `slots[lo:hi]`."""

    __slots__ = ("stream", "slots", "lo", "hi")

    def __init__(self, stream: int, slots: np.ndarray | None = None) -> None:
        self.stream = stream
        self.slots = np.empty(64, np.int64) if slots is None else slots
        self.lo = 0
        self.hi = 0 if slots is None else len(slots)

    def append(self, start: int, count: int, capacity: int) -> None:
        if self.hi + count > len(self.slots):
            held = self.hi - self.lo
            if self.lo >= (len(self.slots) + 1) // 2 and held + count <= len(self.slots):
                self.slots[:held] = self.slots[self.lo:self.hi]  # compact in place
            else:
                grown = np.empty(max(2 * len(self.slots), held + count), np.int64)
                grown[:held] = self.slots[self.lo:self.hi]
                self.slots = grown
            self.lo, self.hi = 0, held
        seg = self.slots[self.hi:self.hi + count]
        seg[:] = np.arange(start, start + count, dtype=np.int64)
        if start + count > capacity:
            seg %= capacity
        self.hi += count


class ReplayShard:
    """Up to `capacity` steps, FIFO by steps, sampled as uniform windows within episodes.

    `seed` seeds the shard's own generator, used when `sample` is given no generator; its state is
    saved with the shard. Thread-safe: one lock guards add, sample, save and load.
    """

    def __init__(self, capacity: int, seed: int, name: str = "shard0") -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.name = name
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(self.seed)
        self._reset()

    # ------------------------------------------------------------------------- state

    def _reset(self) -> None:
        self._schema: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None
        self._data: dict[str, np.ndarray] = {}
        self._head = 0  # next slot to write
        self._size = 0  # held steps, the `size` slots before the head
        # Oldest first: (first slot, steps, stream, ((run id, steps), ...)).
        self._chunks: deque[tuple[int, int, int, tuple[tuple[int, int], ...]]] = deque()
        self._runs: list[_Run | None] = []
        self._held = np.zeros(16, np.int64)  # held steps per run id (0 for free ids)
        self._free: list[int] = []  # heap of free run ids below len(self._runs)
        self._open: dict[int, int] = {}  # stream -> id of the run its next chunk may continue
        self._counters = dict.fromkeys(
            ("inserts", "samples", "steps_inserted", "steps_sampled", "steps_evicted", "chunks_evicted",
             "refused"), 0)

    def _new_run(self, stream: int) -> int:
        if self._free:
            rid = heapq.heappop(self._free)
            self._runs[rid] = _Run(stream)
        else:
            rid = len(self._runs)
            self._runs.append(_Run(stream))
            if rid >= len(self._held):
                self._held = np.concatenate([self._held, np.zeros(len(self._held), np.int64)])
        self._held[rid] = 0
        return rid

    def _free_run(self, rid: int) -> None:
        self._runs[rid] = None
        self._held[rid] = 0
        heapq.heappush(self._free, rid)

    def _close(self, stream: int) -> None:
        rid = self._open.pop(stream, None)
        if rid is not None and self._held[rid] == 0:
            self._free_run(rid)

    # ------------------------------------------------------------------------- add

    def _validate(self, chunk: Any) -> int:
        """Steps in `chunk`; raises ValueError naming the key if it does not fit the schema."""
        if not isinstance(chunk, dict):
            raise ValueError(f"chunk must be a dict of numpy arrays, got {type(chunk).__name__}")
        expected = list(self._schema) if self._schema is not None else list(B.KEYS)
        missing = [k for k in expected if k not in chunk]
        if missing:
            raise ValueError(f"chunk lacks key(s) {missing}")
        if self._schema is not None and len(chunk) != len(self._schema):
            extra = sorted(str(k) for k in chunk if k not in self._schema)
            raise ValueError(f"chunk has key(s) {extra} that the shard's first chunk did not have")
        n = None
        for key, arr in chunk.items():
            if not isinstance(key, str):
                raise ValueError(f"chunk key {key!r} is not a string")
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"chunk key {key!r}: expected a numpy array, got {type(arr).__name__}")
            if arr.ndim < 1:
                raise ValueError(f"chunk key {key!r}: shape {arr.shape} has no step axis")
            if n is None:
                n, first = arr.shape[0], key
            elif arr.shape[0] != n:
                raise ValueError(f"chunk key {key!r}: shape {arr.shape} has {arr.shape[0]} steps but "
                                 f"{first!r} has {n}")
            if self._schema is not None:
                dtype, trailing = self._schema[key]
                if arr.dtype != dtype or arr.shape[1:] != trailing:
                    raise ValueError(f"chunk key {key!r}: {arr.dtype} {arr.shape}, expected {dtype} "
                                     f"[{n}, {', '.join(map(str, trailing))}] like the shard's first chunk")
                continue
            if arr.dtype.str not in ALLOWED_DTYPES:
                raise ValueError(f"chunk key {key!r}: dtype {arr.dtype} is not a plain numeric or bool dtype")
            if key in _FLAG_KEYS and (arr.dtype != np.bool_ or arr.ndim != 1):
                raise ValueError(f"chunk key {key!r}: {arr.dtype} {arr.shape}, expected bool [{n}]")
            if key in _FLOAT_KEYS and (arr.dtype.kind != "f" or arr.ndim != 1):
                raise ValueError(f"chunk key {key!r}: {arr.dtype} {arr.shape}, expected a float [{n}]")
            if key in _INT_KEYS and (arr.dtype.kind not in "iu" or arr.ndim != 1):
                raise ValueError(f"chunk key {key!r}: {arr.dtype} {arr.shape}, expected an integer [{n}]")
        if not n:
            raise ValueError("chunk has no steps")
        if n > self.capacity:
            raise ValueError(f"chunk of {n} steps exceeds the shard's capacity of {self.capacity}")
        return n

    def add(self, chunk: dict[str, np.ndarray] | bytes, stream: int | None = None) -> int:
        """Appends a chunk `{key: [L, ...]}` of `stream` (chunks of a stream come in order); returns L.

        `chunk` may also be `buffer.codec.encode` bytes whose meta holds the stream id ("stream").
        A chunk that does not match the first chunk's keys, dtypes and shapes is refused with a
        ValueError naming the key; the shard is unchanged except that the stream's episode ends
        there (the next chunk of the stream starts a new run, so no window spans the gap).
        """
        with self._lock:
            try:
                if isinstance(chunk, (bytes, bytearray, memoryview)):
                    chunk, meta = decode(chunk)
                    if "stream" in meta:
                        if stream is not None and stream != meta["stream"]:
                            raise ValueError(f"stream {stream} given, but the encoded chunk's meta says "
                                             f"{meta['stream']!r}")
                        stream = meta["stream"]
                if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)):
                    raise ValueError(f"stream must be an integer id, got {stream!r}")
                stream = int(stream)
                n = self._validate(chunk)
            except ValueError:
                self._counters["refused"] += 1
                if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
                    self._close(int(stream))
                raise
            self._insert(chunk, stream, n)
            return n

    def add_many(self, chunks: Sequence[tuple[int, dict[str, np.ndarray]]]) -> int:
        """Several `(stream, chunk)` pairs in order, e.g. one environment worker call's output
        handed over as one object; returns the steps added."""
        return sum(self.add(chunk, stream) for stream, chunk in chunks)

    def _insert(self, chunk: dict[str, np.ndarray], stream: int, n: int) -> None:
        if self._schema is None:
            self._schema = {k: (a.dtype, a.shape[1:]) for k, a in chunk.items()}
            self._data = {k: np.empty((self.capacity, *a.shape[1:]), a.dtype) for k, a in chunk.items()}
        while self._size + n > self.capacity:
            self._evict_oldest()
        cap, head = self.capacity, self._head
        first = min(n, cap - head)
        for key, ring in self._data.items():
            src = chunk[key]
            ring[head:head + first] = src[:first]
            if first < n:
                ring[:n - first] = src[first:]

        # Split the chunk into runs: a run starts at is_first, after is_last, or where the stream
        # has no run to continue.
        is_first, is_last = chunk[B.IS_FIRST], chunk[B.IS_LAST]
        cuts = np.flatnonzero(is_first[1:] | is_last[:-1]) + 1
        bounds = [0, *cuts.tolist(), n]
        pieces = []
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            if i == 0 and not is_first[0] and stream in self._open:
                rid = self._open[stream]
            else:
                self._close(stream)
                rid = self._open[stream] = self._new_run(stream)
            self._runs[rid].append(head + lo, hi - lo, cap)
            self._held[rid] += hi - lo
            pieces.append((rid, hi - lo))
        if is_last[-1]:
            self._close(stream)
        self._chunks.append((head, n, stream, tuple(pieces)))
        self._head = (head + n) % cap
        self._size += n
        self._counters["inserts"] += 1
        self._counters["steps_inserted"] += n

    def _evict_oldest(self) -> None:
        _, n, stream, pieces = self._chunks.popleft()
        for rid, count in pieces:
            run = self._runs[rid]
            run.lo += count
            self._held[rid] -= count
            if self._held[rid] == 0 and self._open.get(run.stream) != rid:
                self._free_run(rid)
        self._size -= n
        self._counters["steps_evicted"] += n
        self._counters["chunks_evicted"] += 1

    # ------------------------------------------------------------------------- sample

    def _window_counts(self, length: int) -> np.ndarray:
        return np.maximum(self._held[:len(self._runs)] - (length - 1), 0)

    def num_windows(self, length: int) -> int:
        """How many distinct valid windows of `length` steps the shard holds now."""
        _check_positive("length", length)
        with self._lock:
            return int(self._window_counts(length).sum())

    def sample_info(self, length: int) -> dict[str, int]:
        """`{"steps": held steps, "windows": num_windows(length)}` in one call (one round trip)."""
        _check_positive("length", length)
        with self._lock:
            return {"steps": self._size, "windows": int(self._window_counts(length).sum())}

    def sample(self, batch: int, length: int,
               rng: np.random.Generator | int | None = None) -> dict[str, np.ndarray]:
        """`batch` windows of `length` steps, drawn uniformly (with replacement) over all valid windows.

        Returns `{key: [batch, length, ...]}` (fresh arrays). `is_first[:, 0]` is True in every row:
        each window starts the learner's recurrent filter. `rng` is a Generator, an integer seed, or
        None for the shard's own generator; the same generator state gives the same batch.
        Raises ReplayEmptyError if no valid window exists yet (see `num_windows`).
        """
        _check_positive("batch", batch)
        _check_positive("length", length)
        if rng is None:
            gen = self._rng
        elif isinstance(rng, np.random.Generator):
            gen = rng
        elif isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            gen = np.random.default_rng(int(rng))
        else:
            raise TypeError(f"rng must be a numpy Generator, an integer seed or None, got {type(rng).__name__}")
        with self._lock:
            counts = self._window_counts(length)
            cum = np.cumsum(counts)
            total = int(cum[-1]) if len(cum) else 0
            if total == 0:
                raise ReplayEmptyError(
                    f"replay shard {self.name!r} holds no window of {length} steps within one episode "
                    f"yet ({self._size} steps held)")
            draws = gen.integers(0, total, size=batch)
            rids = np.searchsorted(cum, draws, side="right")
            offsets = (draws - (cum[rids] - counts[rids])).tolist()
            idx = np.empty((batch, length), np.int64)
            runs = self._runs
            for row, (rid, off) in enumerate(zip(rids.tolist(), offsets)):
                run = runs[rid]
                start = run.lo + off
                idx[row] = run.slots[start:start + length]
            out = {key: ring[idx] for key, ring in self._data.items()}
            self._counters["samples"] += 1
            self._counters["steps_sampled"] += batch * length
        out[B.IS_FIRST][:, 0] = True
        return out

    # ------------------------------------------------------------------------- stats

    def stats(self) -> dict[str, int]:
        """Steps and chunks held, episodes (runs) with a step held, and the lifetime counters."""
        with self._lock:
            return {"steps": self._size, "capacity": self.capacity, "chunks": len(self._chunks),
                    "episodes": int(np.count_nonzero(self._held[:len(self._runs)])), **self._counters}

    def episodes(self) -> Iterator[dict[str, np.ndarray]]:
        """Every run of held steps (an episode, or the part of it still held) as `{key: [T, ...]}`,
        oldest first, one at a time (fresh arrays; the stored data is unchanged): what `choreo
        export` writes. Meant for a shard nobody adds to meanwhile (a loaded checkpoint)."""
        with self._lock:
            tail = (self._head - self._size) % self.capacity
            live = [rid for rid, run in enumerate(self._runs) if run is not None and run.hi > run.lo]
            live.sort(key=lambda rid: (int(self._runs[rid].slots[self._runs[rid].lo]) - tail) % self.capacity)
        for rid in live:
            with self._lock:
                run = self._runs[rid]
                slots = run.slots[run.lo:run.hi]
                episode = {key: ring[slots] for key, ring in self._data.items()}
            yield episode

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint_path(self, directory: str | os.PathLike) -> Path:
        return Path(directory) / f"{self.name}.msgpack"

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the shard (data, index, counters, generator state) to `<directory>/<name>.msgpack`."""
        path = self.checkpoint_path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            payload = encode(*self._state_arrays())
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC)
                f.write(_HEADER.pack(len(payload), zlib.crc32(payload)))
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise write_failed(path, e) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def _state_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays: dict[str, np.ndarray] = {}
        tail = (self._head - self._size) % self.capacity
        # Held slots in FIFO order as (at most) two contiguous pieces of the ring: no extra copy.
        parts = ([(tail, self._head)] if tail < self._head or self._size == 0
                 else [(tail, self.capacity), (0, self._head)])
        for key, ring in self._data.items():
            for i, (a, b) in enumerate(parts):
                arrays[f"data/{key}/{i}"] = ring[a:b]
        live = [rid for rid, run in enumerate(self._runs) if run is not None]
        arrays["runs/id"] = np.array(live, np.int64)
        arrays["runs/stream"] = np.array([self._runs[r].stream for r in live], np.int64)
        arrays["runs/held"] = np.array([self._runs[r].hi - self._runs[r].lo for r in live], np.int64)
        arrays["runs/slots"] = (np.concatenate([self._runs[r].slots[self._runs[r].lo:self._runs[r].hi] for r in live])
                                if live else np.zeros(0, np.int64))
        chunks = list(self._chunks)
        arrays["chunks/start"] = np.array([c[0] for c in chunks], np.int64)
        arrays["chunks/steps"] = np.array([c[1] for c in chunks], np.int64)
        arrays["chunks/stream"] = np.array([c[2] for c in chunks], np.int64)
        arrays["chunks/pieces"] = np.array([len(c[3]) for c in chunks], np.int64)
        arrays["pieces/run"] = np.array([p[0] for c in chunks for p in c[3]], np.int64)
        arrays["pieces/steps"] = np.array([p[1] for c in chunks for p in c[3]], np.int64)
        arrays["open/stream"] = np.array(list(self._open), np.int64)
        arrays["open/run"] = np.array(list(self._open.values()), np.int64)
        meta = {
            "kind": "replay_shard", "checkpoint_version": CHECKPOINT_VERSION, "name": self.name,
            "capacity": self.capacity, "seed": self.seed, "head": self._head, "size": self._size,
            "parts": len(parts), "num_run_ids": len(self._runs),
            "schema": None if self._schema is None else
            {k: [dt.str, list(shape)] for k, (dt, shape) in self._schema.items()},
            "counters": dict(self._counters),
            "rng": json.dumps(self._rng.bit_generator.state),
        }
        return arrays, meta

    def load(self, directory: str | os.PathLike) -> None:
        """Restores the shard saved by `save` exactly (data, index, counters, generator state).

        A missing file raises FileNotFoundError; a truncated or corrupted one raises CodecError
        naming the file. On any error the shard is left as it was.
        """
        path = self.checkpoint_path(directory)
        raw = path.read_bytes()
        try:
            state = self._parse(raw)
        except CodecError as exc:
            raise CodecError(f"replay checkpoint {path}: {exc}") from None
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(f"replay checkpoint {path}: {exc}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise CodecError(f"replay checkpoint {path}: inconsistent contents ({type(exc).__name__}: {exc})") from None
        with self._lock:
            for attr, value in state.items():
                setattr(self, attr, value)

    def _parse(self, raw: bytes) -> dict[str, Any]:
        """The shard's attributes rebuilt from a checkpoint file's bytes (validated, nothing assigned)."""
        head_len = len(_MAGIC) + _HEADER.size
        if len(raw) < head_len or not raw.startswith(_MAGIC):
            raise CodecError("not a replay shard checkpoint (bad or missing header)")
        length, crc = _HEADER.unpack_from(raw, len(_MAGIC))
        payload = memoryview(raw)[head_len:]
        if len(payload) != length:
            raise CodecError(f"truncated or padded: {len(payload)} payload bytes, header says {length}")
        if zlib.crc32(payload) != crc:
            raise CodecError("checksum mismatch: the file is corrupted")
        arrays, meta = decode(payload)
        if meta.get("kind") != "replay_shard" or meta.get("checkpoint_version") != CHECKPOINT_VERSION:
            raise CodecError(f"not a version-{CHECKPOINT_VERSION} replay shard checkpoint")
        if meta["capacity"] != self.capacity:
            raise CheckpointMismatchError(f"the checkpoint holds a shard of capacity {meta['capacity']}, this shard has "
                             f"{self.capacity}; build the shard with the saved capacity")
        cap, head, size, nparts = self.capacity, int(meta["head"]), int(meta["size"]), int(meta["parts"])
        if not (0 <= head < cap and 0 <= size <= cap and nparts in (1, 2)):
            raise ValueError(f"head {head} / size {size} / parts {nparts} out of range")
        counters = {k: int(meta["counters"][k]) for k in self._counters}

        schema, data = None, {}
        if meta["schema"] is not None:
            schema = {k: (np.dtype(dt), tuple(int(d) for d in shape)) for k, (dt, shape) in meta["schema"].items()}
            tail = (head - size) % cap
            for key, (dtype, trailing) in schema.items():
                ring = np.empty((cap, *trailing), dtype)
                pieces = [arrays[f"data/{key}/{i}"] for i in range(nparts)]
                stacked = sum(len(p) for p in pieces)
                if stacked != size or any(p.dtype != dtype or p.shape[1:] != trailing for p in pieces):
                    raise ValueError(f"data of key {key!r} does not match the schema and size")
                at = tail
                for p in pieces:
                    ring[at:at + len(p)] = p
                    at = (at + len(p)) % cap
                data[key] = ring
        elif size:
            raise ValueError("steps held but no schema")

        num_ids = int(meta["num_run_ids"])
        ids, streams, held_n, slots = (arrays[f"runs/{k}"] for k in ("id", "stream", "held", "slots"))
        if len(slots) != int(held_n.sum()) or (len(ids) and (ids.min() < 0 or ids.max() >= num_ids)):
            raise ValueError("run table inconsistent")
        if len(slots) and (slots.min() < 0 or slots.max() >= cap):
            raise ValueError("run slots out of range")
        runs: list[_Run | None] = [None] * num_ids
        held = np.zeros(max(16, num_ids), np.int64)
        offsets = np.concatenate([[0], np.cumsum(held_n)])
        for i, rid in enumerate(ids.tolist()):
            runs[rid] = _Run(int(streams[i]), slots[offsets[i]:offsets[i + 1]].copy())
            held[rid] = held_n[i]
        free = [rid for rid in range(num_ids) if runs[rid] is None]
        heapq.heapify(free)

        chunk_pieces = arrays["chunks/pieces"]
        piece_run, piece_steps = arrays["pieces/run"].tolist(), arrays["pieces/steps"].tolist()
        if len(piece_run) != int(chunk_pieces.sum()) or int(arrays["chunks/steps"].sum()) != size:
            raise ValueError("chunk table inconsistent")
        chunks, at = deque(), 0
        for start, n, stream, k in zip(arrays["chunks/start"].tolist(), arrays["chunks/steps"].tolist(),
                                       arrays["chunks/stream"].tolist(), chunk_pieces.tolist()):
            pieces = tuple(zip(piece_run[at:at + k], piece_steps[at:at + k]))
            if any(runs[r] is None for r, _ in pieces):
                raise ValueError("a chunk refers to a run that is not in the checkpoint")
            chunks.append((start, n, stream, pieces))
            at += k
        open_runs = dict(zip(arrays["open/stream"].tolist(), arrays["open/run"].tolist()))
        if any(not 0 <= r < num_ids or runs[r] is None for r in open_runs.values()):
            raise ValueError("an open stream refers to a run that is not in the checkpoint")
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(meta["rng"])
        return {"_schema": schema, "_data": data, "_head": head, "_size": size, "_chunks": chunks,
                "_runs": runs, "_held": held, "_free": free, "_open": open_runs, "_counters": counters,
                "_rng": rng}


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
