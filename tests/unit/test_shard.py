"""ReplayShard: FIFO eviction, windows within one episode, uniform sampling, checkpoints, validation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from choreo import vocabulary as B
from choreo.buffer.codec import CodecError, encode
from choreo.buffer.shard import CheckpointMismatchError, ReplayEmptyError, ReplayShard

# observation columns: episode id (unique over all streams), step index within the episode,
# stream id, insertion counter of the step over the whole shard
EP, STEP, STREAM, SERIAL = 0, 1, 2, 3


class Streams:
    """Deterministic interleaved streams; each step's observation says where it came from."""

    def __init__(self, num_streams: int, episode_lengths, seed: int = 0, obs_dim: int = 4) -> None:
        self.rng = np.random.default_rng(seed)
        self.episode_lengths = episode_lengths  # callable rng -> length
        self.obs_dim = obs_dim
        self.next_episode = 0
        self.serial = 0
        self.state = {s: self._new_episode() for s in range(num_streams)}

    def _new_episode(self) -> list[int]:
        ep = self.next_episode
        self.next_episode += 1
        return [ep, 0, int(self.episode_lengths(self.rng))]  # id, next step, length

    def chunk(self, stream: int, n: int) -> dict[str, np.ndarray]:
        obs = np.zeros((n, self.obs_dim), np.float32)
        is_first, is_last = np.zeros(n, bool), np.zeros(n, bool)
        for i in range(n):
            ep, step, length = self.state[stream]
            obs[i, :4] = (ep, step, stream, self.serial)
            is_first[i] = step == 0
            is_last[i] = step == length - 1
            self.serial += 1
            self.state[stream] = self._new_episode() if step == length - 1 else [ep, step + 1, length]
        return make_chunk(obs, is_first, is_last)


def make_chunk(obs: np.ndarray, is_first: np.ndarray, is_last: np.ndarray | None = None) -> dict[str, np.ndarray]:
    n = len(obs)
    is_last = np.zeros(n, bool) if is_last is None else is_last
    return {B.OBSERVATION: obs, B.ACTION: np.tile(obs[:, :1], (1, 2)).astype(np.float32),
            B.REWARD: obs[:, 1].astype(np.float32), B.DISCOUNT: np.ones(n, np.float32),
            B.IS_FIRST: is_first, B.IS_LAST: is_last, B.IS_TERMINAL: is_last.copy(),
            B.SKILL: np.full(n, 3, np.int32), B.POLICY_VERSION: np.arange(n, dtype=np.int64)}


def simple_chunk(n: int = 50, first: bool = True, start: float = 0.0) -> dict[str, np.ndarray]:
    obs = np.zeros((n, 4), np.float32)
    obs[:, SERIAL] = start + np.arange(n)
    is_first = np.zeros(n, bool)
    is_first[0] = first
    return make_chunk(obs, is_first)


def fill(shard: ReplayShard, streams: Streams, chunks: int, lengths=(50,), seed: int = 1) -> list:
    """Adds `chunks` chunks of random streams and lengths; returns [(stream, chunk)] in order."""
    rng = np.random.default_rng(seed)
    added = []
    for _ in range(chunks):
        s = int(rng.integers(len(streams.state)))
        c = streams.chunk(s, int(rng.choice(lengths)))
        shard.add(c, s)
        added.append((s, c))
    return added


def expected_windows(added: list, capacity: int, length: int) -> int:
    """Windows by brute force: FIFO-evict chunks, order each stream's steps, cut at episode starts."""
    held, size = [], 0
    for s, c in added:
        n = len(c[B.REWARD])
        while size + n > capacity:
            size -= len(held.pop(0)[1][B.REWARD])
        held.append((s, c))
        size += n
    per_stream: dict[int, list] = {}
    for s, c in held:
        per_stream.setdefault(s, []).extend(zip(c[B.OBSERVATION][:, EP], c[B.OBSERVATION][:, STEP]))
    total = 0
    for steps in per_stream.values():
        run = 0
        for i, (ep, step) in enumerate(steps):
            if i == 0 or ep != steps[i - 1][0] or step != steps[i - 1][1] + 1:
                total += max(0, run - length + 1)
                run = 0
            run += 1
        total += max(0, run - length + 1)
    return total


def check_windows(batch: dict[str, np.ndarray], length: int) -> None:
    obs = batch[B.OBSERVATION]
    assert obs.shape[1] == length
    assert (obs[:, :, EP] == obs[:, :1, EP]).all(), "a window crosses episodes"
    assert (obs[:, :, STREAM] == obs[:, :1, STREAM]).all(), "a window crosses streams"
    assert (np.diff(obs[:, :, STEP], axis=1) == 1).all(), "steps in a window are not consecutive"
    assert batch[B.IS_FIRST][:, 0].all()
    assert not batch[B.IS_FIRST][:, 1:].any()
    np.testing.assert_array_equal(batch[B.REWARD], obs[:, :, STEP])  # keys gathered at the same slots


# ----------------------------------------------------------------------------- eviction


def test_fifo_eviction_oldest_steps_first():
    shard = ReplayShard(capacity=200, seed=0)
    for i in range(10):
        shard.add(simple_chunk(50, first=i == 0, start=50 * i), stream=0)
        assert shard.stats()["steps"] <= 200
    st = shard.stats()
    assert st["steps"] == 200 and st["chunks"] == 4
    assert st["inserts"] == 10 and st["steps_inserted"] == 500
    assert st["steps_evicted"] == 300 and st["chunks_evicted"] == 6
    serials = shard.sample(4000, 1, rng=0)[B.OBSERVATION][:, 0, SERIAL]
    assert set(serials.tolist()) == set(range(300, 500))  # exactly the newest 200 steps


def test_capacity_never_exceeded_with_mixed_chunk_lengths():
    cap = 333
    shard = ReplayShard(capacity=cap, seed=0)
    streams = Streams(3, lambda r: r.integers(5, 120))
    rng = np.random.default_rng(0)
    inserted = 0
    for _ in range(200):
        n = int(rng.integers(1, 90))
        s = int(rng.integers(3))
        shard.add(streams.chunk(s, n), s)
        inserted += n
        st = shard.stats()
        assert st["steps"] <= cap
        assert st["steps"] + st["steps_evicted"] == inserted == st["steps_inserted"]
    held = shard.sample(5000, 1, rng=1)[B.OBSERVATION][:, 0, SERIAL]
    assert held.min() >= inserted - cap  # nothing older than the newest `cap` steps survives


def test_chunk_larger_than_capacity_refused():
    shard = ReplayShard(capacity=40, seed=0)
    with pytest.raises(ValueError, match="exceeds the shard's capacity of 40"):
        shard.add(simple_chunk(50), 0)
    assert shard.stats()["steps"] == 0


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("capacity", [10_000, 1_537])  # no eviction; eviction with a wrapping ring
def test_windows_never_cross_episodes(capacity):
    shard = ReplayShard(capacity=capacity, seed=0)
    streams = Streams(5, lambda r: r.integers(3, 160))  # shorter than, and spanning many chunks
    added = fill(shard, streams, 120, lengths=(7, 20, 50))
    for length in (1, 8, 30, 64):
        assert shard.num_windows(length) == expected_windows(added, capacity, length)
        if shard.num_windows(length):
            for seed in range(5):
                check_windows(shard.sample(200, length, rng=seed), length)


def test_episode_spans_chunks_and_interleaved_streams():
    shard = ReplayShard(capacity=1000, seed=0)
    streams = Streams(2, lambda r: 100)
    for _ in range(4):  # chunks of 25: each episode spans 4 chunks, streams alternate
        for s in (0, 1):
            shard.add(streams.chunk(s, 25), s)
    assert shard.num_windows(100) == 2  # one full episode per stream
    batch = shard.sample(50, 100, rng=3)
    check_windows(batch, 100)
    assert set(batch[B.OBSERVATION][:, 0, STREAM].tolist()) == {0, 1}
    assert shard.num_windows(101) == 0
    assert shard.stats()["episodes"] == 2


def test_window_may_start_at_episode_start_and_after_is_last():
    shard = ReplayShard(capacity=100, seed=0)
    obs = np.zeros((10, 4), np.float32)
    obs[:, EP] = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # episode 2 lacks is_first, but follows is_last
    obs[:, STEP] = [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    is_first = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], bool)
    is_last = np.array([0, 0, 1, 0, 0, 0, 1, 0, 0, 0], bool)
    shard.add(make_chunk(obs, is_first, is_last), 0)
    assert shard.num_windows(3) == 1 + 2 + 1
    check_windows(shard.sample(100, 3, rng=0), 3)


def test_refused_chunk_ends_the_stream_run():
    shard = ReplayShard(capacity=100, seed=0)
    shard.add(simple_chunk(10, first=True, start=0), 0)
    bad = simple_chunk(10, first=False, start=10)
    bad[B.REWARD] = bad[B.REWARD].astype(np.float64)
    with pytest.raises(ValueError, match="'reward'"):
        shard.add(bad, 0)
    shard.add(simple_chunk(10, first=False, start=20), 0)  # continues nothing: steps 10..19 are missing
    assert shard.num_windows(11) == 0
    assert shard.num_windows(10) == 2


def test_no_window_raises_clear_error():
    shard = ReplayShard(capacity=100, seed=0)
    with pytest.raises(ReplayEmptyError, match="no window of 5 steps"):
        shard.sample(2, 5, rng=0)
    shard.add(simple_chunk(4), 0)
    assert shard.num_windows(5) == 0
    with pytest.raises(ReplayEmptyError, match="4 steps held"):
        shard.sample(2, 5, rng=0)
    shard.add(simple_chunk(4, first=False), 0)
    assert shard.num_windows(5) == 4


def test_sampling_is_uniform_over_windows():
    shard = ReplayShard(capacity=10_000, seed=0)
    streams = Streams(3, lambda r: r.integers(6, 40))
    fill(shard, streams, 30, lengths=(9, 17))
    length = 5
    total = shard.num_windows(length)
    counts: Counter = Counter()
    rng = np.random.default_rng(123)
    draws = 0
    for _ in range(100):
        obs = shard.sample(1000, length, rng)[B.OBSERVATION][:, 0]
        counts.update(zip(obs[:, EP].tolist(), obs[:, STEP].tolist()))
        draws += 1000
    assert len(counts) == total  # every window is reachable
    expected = draws / total
    observed = np.array(list(counts.values()))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = total - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)
    # long episodes are not favoured: windows per episode are proportional to their count
    assert observed.min() > 0.5 * expected and observed.max() < 1.5 * expected


def test_same_seed_same_batch():
    shard = ReplayShard(capacity=2000, seed=0)
    fill(shard, Streams(4, lambda r: r.integers(20, 200)), 60)
    a, b = shard.sample(16, 10, rng=7), shard.sample(16, 10, rng=np.random.default_rng(7))
    for key in B.KEYS:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].shape[:2] == (16, 10)
    c = shard.sample(16, 10, rng=8)
    assert not np.array_equal(a[B.OBSERVATION], c[B.OBSERVATION])
    # the shard's own generator is seeded by `seed`
    other = ReplayShard(capacity=2000, seed=0)
    fill(other, Streams(4, lambda r: r.integers(20, 200)), 60)
    np.testing.assert_array_equal(shard.sample(8, 10)[B.OBSERVATION], other.sample(8, 10)[B.OBSERVATION])


def test_sample_returns_copies_and_layout():
    shard = ReplayShard(capacity=500, seed=0)
    fill(shard, Streams(2, lambda r: 80), 8)
    batch = shard.sample(3, 4, rng=0)
    assert batch[B.OBSERVATION].shape == (3, 4, 4) and batch[B.OBSERVATION].dtype == np.float32
    assert batch[B.ACTION].shape == (3, 4, 2)
    assert batch[B.SKILL].dtype == np.int32 and batch[B.POLICY_VERSION].dtype == np.int64
    batch[B.OBSERVATION][:] = -1  # writing into a batch leaves the shard alone
    assert (shard.sample(50, 1, rng=0)[B.OBSERVATION] >= 0).all()


def test_encoded_chunk_with_stream_in_meta():
    shard = ReplayShard(capacity=500, seed=0)
    streams = Streams(2, lambda r: 30)
    shard.add(encode(streams.chunk(1, 20), {"stream": 1}))
    shard.add(streams.chunk(1, 20), 1)
    check_windows(shard.sample(20, 25, rng=0), 25)
    with pytest.raises(ValueError, match="stream 0 given"):
        shard.add(encode(streams.chunk(1, 5), {"stream": 1}), 0)
    with pytest.raises(CodecError):
        shard.add(encode(streams.chunk(1, 5), {"stream": 1})[:-3])


# ----------------------------------------------------------------------------- validation


def _snapshot(shard: ReplayShard) -> tuple:
    st = shard.stats()
    for counter in ("refused", "samples", "steps_sampled"):  # snapshots sample, refusals count
        st.pop(counter)
    return st, shard.sample(30, 5, rng=0)[B.OBSERVATION].tobytes()


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.pop(B.DISCOUNT), r"lacks key\(s\) \['discount'\]"),
    (lambda c: c.update(extra=np.zeros(10)), r"\['extra'\]"),
    (lambda c: c.update({B.OBSERVATION: c[B.OBSERVATION].astype(np.float64)}), r"'observation'.*float64.*float32"),
    (lambda c: c.update({B.OBSERVATION: np.zeros((10, 5), np.float32)}), r"'observation'.*\(10, 5\).*\[10, 4\]"),
    (lambda c: c.update({B.ACTION: np.zeros((9, 2), np.float32)}), r"'action'.*9 steps"),
    (lambda c: c.update({B.IS_FIRST: c[B.IS_FIRST].astype(np.uint8)}), r"'is_first'.*uint8"),
    (lambda c: c.update({B.REWARD: list(c[B.REWARD])}), r"'reward'.*numpy array"),
])
def test_bad_chunks_refused_with_clear_message(mutate, match):
    shard = ReplayShard(capacity=100, seed=0)
    streams = Streams(1, lambda r: 1000)
    shard.add(streams.chunk(0, 30), 0)
    before = _snapshot(shard)
    bad = streams.chunk(0, 10)
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        shard.add(bad, 0)
    assert _snapshot(shard) == before
    assert shard.stats()["refused"] == 1


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update({B.IS_LAST: c[B.IS_LAST].astype(np.int8)}), r"'is_last'.*expected bool"),
    (lambda c: c.update({B.REWARD: np.zeros((10, 1), np.float32)}), r"'reward'.*expected a float \[10\]"),
    (lambda c: c.update({B.SKILL: np.zeros(10, np.float32)}), r"'skill'.*integer"),
    (lambda c: c.update({B.OBSERVATION: np.zeros(10, object)}), r"'observation'.*dtype object"),
    (lambda c: c.update({B.OBSERVATION: np.zeros((), np.float32)}), r"'observation'.*no step axis"),
])
def test_first_chunk_checked_against_the_batch_layout(mutate, match):
    shard = ReplayShard(capacity=100, seed=0)
    bad = simple_chunk(10)
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        shard.add(bad, 0)
    shard.add(simple_chunk(10), 0)  # the schema was not fixed by the refused chunk
    assert shard.stats()["steps"] == 10


def test_bad_stream_and_arguments():
    shard = ReplayShard(capacity=100, seed=0)
    with pytest.raises(ValueError, match="stream"):
        shard.add(simple_chunk(10), "a")
    with pytest.raises(ValueError, match="capacity"):
        ReplayShard(capacity=0, seed=0)
    shard.add(simple_chunk(10), 0)
    with pytest.raises(ValueError, match="length"):
        shard.sample(2, 0, rng=0)
    with pytest.raises(ValueError, match="batch"):
        shard.sample(0, 2, rng=0)


# ----------------------------------------------------------------------------- checkpoints


def _filled(capacity=700, seed=0) -> ReplayShard:
    shard = ReplayShard(capacity=capacity, seed=seed)
    fill(shard, Streams(4, lambda r: r.integers(10, 150)), 50, lengths=(10, 33, 50))
    return shard


def test_save_load_exact(tmp_path):
    shard = _filled()
    shard.sample(4, 3)  # advance the shard's own generator
    path = shard.save(tmp_path)
    assert path == tmp_path / "shard0.msgpack" and path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temporary file left
    restored = ReplayShard(capacity=700, seed=99)
    restored.load(tmp_path)
    assert restored.stats() == shard.stats()
    for length in (1, 10, 40):
        assert restored.num_windows(length) == shard.num_windows(length)
    for rng in (5, None):
        a, b = shard.sample(32, 10, rng), restored.sample(32, 10, rng)
        for key in B.KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    # both evolve identically afterwards: same eviction, same run ids, same samples
    more = Streams(4, lambda r: r.integers(10, 150), seed=5)
    for i in range(20):
        c = more.chunk(i % 4, 40)
        shard.add(c, i % 4)
        restored.add(c, i % 4)
    assert restored.stats() == shard.stats()
    np.testing.assert_array_equal(shard.sample(64, 12, 3)[B.OBSERVATION], restored.sample(64, 12, 3)[B.OBSERVATION])


def test_save_load_empty_shard(tmp_path):
    ReplayShard(capacity=50, seed=0, name="empty").save(tmp_path)
    restored = ReplayShard(capacity=50, seed=0, name="empty")
    restored.load(tmp_path)
    assert restored.stats()["steps"] == 0
    restored.add(simple_chunk(20), 0)
    assert restored.num_windows(20) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "header"])
def test_corrupted_checkpoint_raises_and_keeps_contents(tmp_path, damage):
    _filled().save(tmp_path)
    path = tmp_path / "shard0.msgpack"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        raw = bytearray()
    else:
        raw[3] ^= 1
    path.write_bytes(bytes(raw))
    shard = _filled(seed=1)
    other = Streams(1, lambda r: 60, seed=9)
    shard.add(other.chunk(0, 50), 7)
    before = _snapshot(shard)
    with pytest.raises(CodecError, match="shard0.msgpack"):
        shard.load(tmp_path)
    assert _snapshot(shard) == before


def test_load_checks_capacity_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ReplayShard(capacity=700, seed=0).load(tmp_path)
    _filled().save(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="capacity 700"):
        ReplayShard(capacity=800, seed=0).load(tmp_path)


def test_each_truncation_of_a_small_checkpoint_raises(tmp_path):
    shard = ReplayShard(capacity=30, seed=0)
    shard.add(simple_chunk(12), 0)
    raw = shard.save(tmp_path).read_bytes()
    target = ReplayShard(capacity=30, seed=0)
    for cut in range(0, len(raw), 7):
        (tmp_path / "shard0.msgpack").write_bytes(raw[:cut])
        with pytest.raises(CodecError):
            target.load(tmp_path)
    assert target.stats()["steps"] == 0
