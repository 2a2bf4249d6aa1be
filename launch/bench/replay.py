"""`choreo bench replay`: insert and sample speed of the replay service, in one process.

For each observation kind (states: 24-dim float32; pixels: uint8 [3, 64, 64]) and each shard
count, builds that many ReplayShard objects behind one ReplayClient (local calls, no limiter),
inserts chunks of 50 steps from 16 interleaved streams (episodes of 1000 steps) until 1.5 x the
capacity went in, then draws 50 x 50 batches. Prints inserted steps/s overall, while filling (the
first pass also pays for faulting in the ring's fresh pages) and while evicting (the steady state
of a long run), batches/s and the median ms per batch. A figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from choreo import vocabulary as B
from choreo.buffer.client import ReplayClient, route
from choreo.buffer.codec import decode, encode
from choreo.buffer.shard import ReplayShard

ACTION_DIM, CHUNK, STREAMS, EPISODE = 6, 50, 16, 1000
OBS_SHAPES = {"states": (24,), "pixels": (3, 64, 64)}


def _chunks(obs: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """Two chunk templates: one that starts an episode and one that continues it."""
    shape = OBS_SHAPES[obs]
    data = (rng.integers(0, 256, (CHUNK, *shape), dtype=np.uint8) if obs == "pixels"
            else rng.standard_normal((CHUNK, *shape), dtype=np.float32))
    base = {B.OBSERVATION: data, B.ACTION: rng.uniform(-1, 1, (CHUNK, ACTION_DIM)).astype(np.float32),
            B.REWARD: rng.random(CHUNK, dtype=np.float32), B.DISCOUNT: np.ones(CHUNK, np.float32),
            B.IS_FIRST: np.zeros(CHUNK, bool), B.IS_LAST: np.zeros(CHUNK, bool),
            B.IS_TERMINAL: np.zeros(CHUNK, bool), B.SKILL: np.zeros(CHUNK, np.int32),
            B.POLICY_VERSION: np.zeros(CHUNK, np.int64)}
    first = dict(base, **{B.IS_FIRST: np.eye(1, CHUNK, 0, dtype=bool)[0]})
    return first, base


def measure(obs: str, shards: int, capacity: int, batches: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    first, rest = _chunks(obs, rng)
    client = ReplayClient([ReplayShard(capacity // shards, seed=seed + i, name=f"shard{i}") for i in range(shards)],
                          seed=seed)
    fill, total = capacity // CHUNK, int(1.5 * capacity) // CHUNK
    per_episode = EPISODE // CHUNK
    marks = [time.perf_counter()]
    for k in range(total):
        if k == fill:
            marks.append(time.perf_counter())
        stream, index = k % STREAMS, k // STREAMS
        client.shards[route(stream, shards)].add(first if index % per_episode == 0 else rest, stream)
    marks.append(time.perf_counter())

    for _ in range(3):  # warm-up
        client.sample(50, 50)
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        client.sample(50, 50)
        times.append(time.perf_counter() - t)
    stats = [s.stats() for s in client.shards]
    return {"obs": obs, "shards": shards, "capacity": capacity,
            "steps_held": sum(s["steps"] for s in stats),
            "insert_steps_per_s": total * CHUNK / (marks[2] - marks[0]),
            "fill_steps_per_s": fill * CHUNK / (marks[1] - marks[0]),  # first pass: the ring's pages fault in
            "evicting_steps_per_s": (total - fill) * CHUNK / (marks[2] - marks[1]),  # full: each add evicts
            "batches_per_s": len(times) / sum(times),
            "median_batch_ms": 1000 * statistics.median(times),
            "p90_batch_ms": 1000 * float(np.percentile(times, 90))}


def measure_codec(obs: str, repeats: int = 200) -> dict[str, float]:
    first, _ = _chunks(obs, np.random.default_rng(0))
    data = encode(first, {"stream": 3})
    start = time.perf_counter()
    for _ in range(repeats):
        encode(first, {"stream": 3})
    enc = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        decode(data)
    dec = (time.perf_counter() - start) / repeats
    return {"obs": obs, "chunk_bytes": len(data), "encode_us": 1e6 * enc, "decode_us": 1e6 * dec}


def run(rest: list[str], as_json: bool = False) -> int:
    p = argparse.ArgumentParser(prog="choreo bench replay")
    p.add_argument("--obs", choices=["states", "pixels", "both"], default="both")
    p.add_argument("--shards", default="1,2", help="comma-separated shard counts")
    p.add_argument("--capacity-states", type=int, default=1_000_000, help="steps over all shards (states)")
    p.add_argument("--capacity-pixels", type=int, default=100_000, help="steps over all shards (pixels, 12 KB each)")
    p.add_argument("--batches", type=int, default=100, help="timed 50 x 50 batches per setting")
    args = p.parse_args(rest)
    try:
        counts = [int(x) for x in args.shards.split(",") if x]
    except ValueError:
        raise SystemExit(f"choreo bench replay: --shards must be comma-separated integers, got {args.shards!r}")
    if not counts or min(counts) < 1:
        raise SystemExit("choreo bench replay: --shards needs at least one count >= 1")
    kinds = ["states", "pixels"] if args.obs == "both" else [args.obs]

    results, codec = [], []
    for obs in kinds:
        capacity = args.capacity_states if obs == "states" else args.capacity_pixels
        codec.append(measure_codec(obs))
        for n in counts:
            if not as_json:
                print(f"replay benchmark: {obs}, {n} shard(s), capacity {capacity:,} steps ...", flush=True)
            results.append(measure(obs, n, capacity, args.batches))
    if as_json:
        print(json.dumps({"results": results, "codec": codec}, indent=2))
        return 0
    print(f"\n{'obs':<7} {'shards':>6} {'insert steps/s':>15} {'(filling':>10} {'evicting)':>10} "
          f"{'batches/s':>10} {'median ms':>10} {'p90 ms':>8}")
    for r in results:
        print(f"{r['obs']:<7} {r['shards']:>6} {r['insert_steps_per_s']:>15,.0f} {r['fill_steps_per_s']:>10,.0f} "
              f"{r['evicting_steps_per_s']:>10,.0f} {r['batches_per_s']:>10,.1f} "
              f"{r['median_batch_ms']:>10.2f} {r['p90_batch_ms']:>8.2f}")
    for c in codec:
        print(f"codec, {c['obs']} chunk of {CHUNK} ({c['chunk_bytes']:,} bytes): encode {c['encode_us']:.0f} us, "
              f"decode {c['decode_us']:.0f} us")
    return 0
