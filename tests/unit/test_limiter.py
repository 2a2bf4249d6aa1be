"""RateLimiter: holds sampled/inserted near the target, min_size gate, never deadlocks, resumes."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from choreo.buffer.codec import decode, encode
from choreo.buffer.limiter import RateLimiter


@pytest.mark.parametrize("args, name", [
    ((-1.0, 0.1, 0), "samples_per_insert"),
    ((float("nan"), 0.1, 0), "samples_per_insert"),
    ((math.inf, 0.1, 0), "samples_per_insert"),
    ((1.0, -0.1, 0), "tolerance"),
    ((1.0, 0.1, -5), "min_size"),
    ((1.0, 0.1, 2.5), "min_size"),
])
def test_impossible_settings_refused(args, name):
    with pytest.raises(ValueError, match=name):
        RateLimiter(*args)


def test_min_size_gate():
    lim = RateLimiter(samples_per_insert=1.0, tolerance=0.5, min_size=100)
    for _ in range(9):
        assert lim.can_insert(10)  # inserts always allowed below min_size
        assert not lim.can_sample(1)
        lim.on_insert(10)
    assert not lim.can_sample(1)  # 90 < 100
    lim.on_insert(10)
    assert not lim.can_sample(1)  # warm-up complete; the ratio counts only what comes after it
    lim.on_insert(100)
    assert lim.can_sample(100)
    assert lim.can_sample(150) and not lim.can_sample(151)  # 1.5 x the 100 steps beyond the warm-up


def test_zero_means_unlimited():
    lim = RateLimiter(samples_per_insert=0, tolerance=0.1, min_size=50)
    assert not lim.can_sample(1)
    lim.on_insert(50)
    assert lim.can_sample(10_000)  # no ratio: the warm-up alone opens sampling
    lim.on_insert(50)
    for _ in range(100):
        assert lim.can_sample(10_000) and lim.can_insert(1)
        lim.on_sample(10_000)
    assert lim.ratio() == 20_000.0  # 1e6 sampled over the 50 steps beyond the warm-up


def _simulate(lim: RateLimiter, ticks: int, chunk: int, batch: int, seed: int, actor_share: float):
    """Actors and the learner compete for turns at random; each acts only when the limiter allows.
    Returns the ratio after every tick past min_size and how often each side acted."""
    rng = np.random.default_rng(seed)
    ratios, acted = [], {"insert": 0, "sample": 0}
    for _ in range(ticks):
        if rng.random() < actor_share:
            if lim.can_insert(chunk):
                lim.on_insert(chunk)
                acted["insert"] += 1
        elif lim.can_sample(batch):
            lim.on_sample(batch)
            acted["sample"] += 1
        assert lim.can_sample(batch) or lim.can_insert(chunk), "both sides refused"
        if lim.stats()["inserted"] >= lim.min_size:
            ratios.append(lim.ratio())
    return np.array(ratios), acted


@pytest.mark.parametrize("actor_share", [0.05, 0.5, 0.95])  # slow actors, balanced, slow learner
def test_holds_ratio_within_tolerance(actor_share):
    target, tol = 4.0, 0.1
    lim = RateLimiter(samples_per_insert=target, tolerance=tol, min_size=500)
    ratios, acted = _simulate(lim, 30_000, chunk=50, batch=64, seed=0, actor_share=actor_share)
    assert acted["insert"] > 100 and acted["sample"] > 100  # both sides keep going
    settled = ratios[len(ratios) // 4:]  # past the warm-up, where the learner catches up
    assert settled.min() >= target * (1 - tol) * 0.97  # one chunk of slack under the band
    assert settled.max() <= target * (1 + tol)
    assert abs(lim.ratio() / target - 1) <= tol


def test_sampling_never_exceeds_upper_bound():
    lim = RateLimiter(samples_per_insert=2.0, tolerance=0.25, min_size=0)
    rng = np.random.default_rng(1)
    for _ in range(5000):
        if rng.random() < 0.3:
            lim.on_insert(int(rng.integers(1, 60)))
        n = int(rng.integers(1, 200))
        if lim.can_sample(n):
            lim.on_sample(n)
        st = lim.stats()
        assert st["sampled"] <= 2.0 * 1.25 * st["inserted"]


@pytest.mark.parametrize("target, tol, chunk, batch", [(1.0, 0.0, 50, 120), (250.0, 0.1, 50, 2500),
                                                        (0.5, 0.01, 1000, 7), (3.0, 0.0, 1, 1)])
def test_never_both_refused(target, tol, chunk, batch):
    """Over a grid of counter states: whenever the actors are refused, the learner is allowed."""
    lim = RateLimiter(samples_per_insert=target, tolerance=tol, min_size=100)
    for inserted in [0, 99, 100, 101, 150, 1000, 12345]:
        for sampled in np.unique(np.linspace(0, target * 2.5 * inserted + 2 * batch, 200).astype(int)):
            lim.load_state_dict({**lim.state_dict(), "inserted": inserted, "sampled": int(sampled)})
            lim.can_sample(batch)  # the learner states its demand
            assert lim.can_insert(chunk) or lim.can_sample(batch), (inserted, sampled)


def test_no_deadlock_with_zero_tolerance_and_threads():
    """Actors and a learner in threads, polling; both progress with a band of width zero."""
    lim = RateLimiter(samples_per_insert=1.0, tolerance=0.0, min_size=100)
    done = {"insert": 0, "sample": 0}
    deadline = time.monotonic() + 10

    def running() -> bool:
        return (done["insert"] < 300 or done["sample"] < 100) and time.monotonic() < deadline

    def actor():
        while running():
            if lim.try_insert(50):
                done["insert"] += 1
            else:
                time.sleep(0)

    def learner():
        while running():
            if lim.try_sample(120):
                done["sample"] += 1
            else:
                time.sleep(0)

    threads = [threading.Thread(target=actor), threading.Thread(target=learner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done["insert"] >= 300 and done["sample"] >= 100
    assert lim.ratio() == pytest.approx(1.0, abs=0.05)


def test_state_round_trip():
    lim = RateLimiter(samples_per_insert=3.0, tolerance=0.2, min_size=10)
    _simulate(lim, 500, chunk=5, batch=8, seed=2, actor_share=0.5)
    lim.record_wait("insert", 0.25)
    lim.record_wait("sample", 1.5)
    lim.record_wait("sample", 0.5)
    state = lim.state_dict()
    _, meta = decode(encode({}, {"limiter": state}))  # plain values: fits a msgpack checkpoint
    other = RateLimiter(samples_per_insert=3.0, tolerance=0.2, min_size=10)
    other.load_state_dict(meta["limiter"])
    assert other.stats() == lim.stats()
    assert other.stats()["sample_wait_s"] == 2.0 and other.stats()["sample_wait_count"] == 2
    for steps in (1, 8, 50, 500):
        assert other.can_sample(steps) == lim.can_sample(steps)
        assert other.can_insert(steps) == lim.can_insert(steps)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"inserted": 1})
    with pytest.raises(ValueError, match="inserted"):
        other.load_state_dict({**state, "inserted": -1})


def test_wait_accounting_and_helpers():
    lim = RateLimiter(samples_per_insert=1.0, tolerance=0.1, min_size=0)
    with pytest.raises(ValueError, match="side"):
        lim.record_wait("learner", 1.0)
    with pytest.raises(ValueError, match="seconds"):
        lim.record_wait("insert", -1.0)
    assert lim.ratio() == 0.0
    assert lim.try_insert(10) and not lim.try_sample(12) and lim.try_sample(11)
    assert lim.ratio() == pytest.approx(1.1)
    with pytest.raises(ValueError, match="steps"):
        lim.on_insert(-3)


def test_the_warm_up_counts_frames_whatever_the_action_repeat():
    from choreo.launch.runtime.build import make_limiter
    from choreo.launch.runtime.config import load_config

    for preset, repeat in (("states", 1), ("pixels", 2), ("metaworld", 2)):
        config = load_config([preset])
        assert config.env.action_repeat == repeat and config.replay.min_size == 4000  # the reference's seed frames
        assert make_limiter(config).min_size == 4000 // repeat
    assert make_limiter(load_config(["pixels"], ["replay.min_size=4001"])).min_size == 2001  # never fewer frames
