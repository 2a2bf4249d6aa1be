"""ReplayClient: stable routing, size-proportional sampling, failing shards, futures."""

from __future__ import annotations

import numpy as np
import pytest

from choreo import vocabulary as B
from choreo.buffer.client import ReplayClient, route
from choreo.buffer.codec import encode
from choreo.buffer.shard import ReplayShard

STREAM, STEP = 0, 1  # observation columns


def chunk(stream: int, start: int, n: int = 25, episode: int = 1000) -> dict[str, np.ndarray]:
    steps = np.arange(start, start + n)
    obs = np.stack([np.full(n, stream), steps % episode], axis=1).astype(np.float32)
    is_first = steps % episode == 0
    return {B.OBSERVATION: obs, B.ACTION: np.zeros((n, 2), np.float32), B.REWARD: np.zeros(n, np.float32),
            B.DISCOUNT: np.ones(n, np.float32), B.IS_FIRST: is_first, B.IS_LAST: steps % episode == episode - 1,
            B.IS_TERMINAL: np.zeros(n, bool), B.SKILL: np.zeros(n, np.int32),
            B.POLICY_VERSION: np.zeros(n, np.int64)}


def add(client: ReplayClient, chunk, worker: int) -> None:
    """What a worker does: send its chunk to its own shard (the client only reads)."""
    client.shards[route(worker, len(client.shards))].add(chunk, worker)


def feed(client: ReplayClient, workers, chunks_per_worker: int, n: int = 25) -> None:
    """Worker w writes one stream, numbered w."""
    for k in range(chunks_per_worker):
        for w in workers:
            add(client, chunk(w, k * n, n), w)


def test_routing_is_stable():
    shards = [ReplayShard(10_000, seed=i, name=f"shard{i}") for i in range(3)]
    client = ReplayClient(shards, seed=0)
    assert [route(w, 3) for w in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="num_shards"):
        route(1, 0)
    feed(client, range(7), 4)
    for i, shard in enumerate(shards):
        held = shard.sample(500, 1, rng=0)[B.OBSERVATION][:, 0, STREAM].astype(int)
        assert set(held.tolist()) == {s for s in range(7) if s % 3 == i}
    assert [s.stats()["steps"] for s in shards] == [300, 200, 200]
    # encoded chunks route the same way
    add(client, encode(chunk(4, 100), {"stream": 4}), 4)
    assert shards[1].stats()["steps"] == 225


def test_sampling_proportional_to_shard_sizes():
    shards = [ReplayShard(100_000, seed=i, name=f"shard{i}") for i in range(3)]
    client = ReplayClient(shards, seed=1)
    for stream, chunks in ((0, 8), (1, 16), (2, 40)):  # 200, 400, 1000 steps
        for k in range(chunks):
            add(client, chunk(stream, 25 * k), stream)
    rows = np.zeros(3)
    for _ in range(200):
        batch = client.sample(32, 10)
        assert batch[B.OBSERVATION].shape == (32, 10, 2)
        assert batch[B.IS_FIRST][:, 0].all()
        rows += np.bincount(batch[B.OBSERVATION][:, 0, STREAM].astype(int), minlength=3)
    expected = np.array([200, 400, 1000]) / 1600 * rows.sum()
    assert np.all(np.abs(rows - expected) < 5 * np.sqrt(expected)), (rows, expected)
    assert client.stats()["shard_rows"] == rows.astype(int).tolist()


def test_shard_without_window_gets_no_rows_and_empty_client_returns_none():
    shards = [ReplayShard(1000, seed=i, name=f"shard{i}") for i in range(2)]
    client = ReplayClient(shards, seed=0)
    assert client.sample(4, 10) is None
    add(client, chunk(0, 0, n=50), 0)
    add(client, chunk(1, 0, n=5), 1)  # shard 1: 5 steps, no window of 10
    for _ in range(20):
        batch = client.sample(8, 10)
        assert (batch[B.OBSERVATION][:, :, STREAM] == 0).all()


def filled_client(seed: int) -> ReplayClient:
    """Two shards that four workers filled, the same for the same seed."""
    shards = [ReplayShard(5000, seed=i, name=f"shard{i}") for i in range(2)]
    client = ReplayClient(shards, seed=seed)
    feed(client, range(4), 6)
    return client


def test_same_seed_same_batch_and_rows_shuffled():
    a, b = filled_client(42), filled_client(42)
    for _ in range(3):
        x, y = a.sample(16, 5), b.sample(16, 5)
        for key in B.KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    streams = x[B.OBSERVATION][:, 0, STREAM].astype(int) % 2
    assert 0 < streams.sum() < 16 and not (np.diff(streams) >= 0).all()  # mixed, not shard-ordered


def test_a_client_at_a_position_draws_what_the_client_that_drew_that_far_draws_next():
    whole = filled_client(7)
    batches = [whole.sample(8, 5) for _ in range(5)]
    assert whole.position == 5
    resumed = filled_client(7)
    resumed.position = 3  # a learner resumed after training on 3 batches
    for expected in batches[3:]:
        got = resumed.sample(8, 5)
        for key in B.KEYS:
            np.testing.assert_array_equal(got[key], expected[key])
    fresh = filled_client(7)
    assert not np.array_equal(fresh.sample(8, 5)[B.OBSERVATION], batches[3][B.OBSERVATION])


class Flaky:
    """A shard whose sample (or every method) starts raising once `broken` is set."""

    def __init__(self, shard: ReplayShard) -> None:
        self.shard, self.broken, self.everything = shard, False, False

    def __getattr__(self, name):
        method = getattr(self.shard, name)

        def wrapped(*args):
            if self.broken and (name == "sample" or self.everything):
                raise ConnectionError(f"{self.shard.name} is gone")
            return method(*args)

        return wrapped


@pytest.mark.parametrize("futures", [False, True])
@pytest.mark.parametrize("everything", [False, True])
def test_failing_shard_does_not_stop_sampling(futures, everything):
    shards = [Flaky(ReplayShard(5000, seed=i, name=f"shard{i}")) for i in range(3)]
    kwargs = {}
    if futures:  # Ray-style: call returns a future, gather resolves (and raises there)
        kwargs = {"call": lambda s, m, *a: (lambda: getattr(s, m)(*a)),
                  "gather": lambda futs: [f() for f in futs]}
    client = ReplayClient(shards, seed=0, refresh_every=3, **kwargs)
    feed(client, range(6), 8)
    client.sample(32, 10)
    shards[1].broken, shards[1].everything = True, everything
    for _ in range(30):
        batch = client.sample(32, 10)
        assert batch[B.OBSERVATION].shape == (32, 10, 2)
        assert not np.isin(batch[B.OBSERVATION][:, 0, STREAM] % 3, [1]).any()
    st = client.stats()
    assert st["failures"] >= 1 and st["shard_failures"][1] == st["failures"]
    assert "shard1 is gone" in client.last_errors[1]
    shards[1].broken = False  # it recovers: weighted again after the next refresh
    seen = set()
    for _ in range(10):
        seen |= set((client.sample(32, 10)[B.OBSERVATION][:, 0, STREAM] % 3).astype(int).tolist())
    assert seen == {0, 1, 2}
    for s in shards:
        s.broken, s.everything = True, True
    with pytest.raises(RuntimeError, match="no replay shard could serve"):
        for _ in range(5):
            client.sample(8, 10)


def test_sizes_cached_between_refreshes():
    calls = []

    def call(shard, method, *args):
        calls.append(method)
        return getattr(shard, method)(*args)

    client = ReplayClient([ReplayShard(5000, seed=0)], seed=0, call=call, refresh_every=5)
    feed(client, range(2), 4)
    for _ in range(20):
        client.sample(4, 5)
    assert calls.count("sample_info") == 4 and calls.count("sample") == 20
    client.sample(4, 6)  # another length: refreshed at once
    assert calls.count("sample_info") == 5
