"""The learner role in one process: prefetch, publishing, checkpoints and snapshots."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.launch.runtime.build import random_batch
from choreo.launch.runtime.config import load_config
from choreo.learner.learner import CHECKPOINT, BatchPrefetcher, Learner, load_torch_file


def test_prefetcher_delivers_in_order_counts_waits_and_surfaces_errors():
    items = iter([{"i": 0}, None, {"i": 1}])

    def sample():
        item = next(items)
        if item is None:
            return None  # "not allowed yet": retried
        return item

    pre = BatchPrefetcher(sample, depth=1)
    assert pre.get(timeout=5)["i"] == 0
    assert pre.get(timeout=5)["i"] == 1
    with pytest.raises(StopIteration):
        pre.get(timeout=5)  # the sampler's exception reaches the learner
    assert pre.wait_seconds >= 0.0
    pre.close()


def test_prefetcher_returns_none_on_timeout_without_data():
    release = threading.Event()

    def sample():
        release.wait()
        return None

    pre = BatchPrefetcher(sample)
    assert pre.get(timeout=0.05) is None
    release.set()
    pre.close()


class _CountingAgent:
    def __init__(self):
        self.seen = []

    def update(self, batch):
        self.seen.append(batch["i"])
        return {"loss": float(batch["i"])}

    def policy_weights(self):
        return {"w": np.array(len(self.seen))}


def test_learner_publishes_every_k_updates_with_the_update_count_as_version(tmp_path):
    cfg = dataclasses.replace(load_config(["tiny"]).learner, publish_every=3)
    counter = iter(range(100))
    published = []
    learner = Learner(_CountingAgent(), lambda: {"i": next(counter)}, lambda w, v: published.append((int(w["w"]), v)),
                      cfg, tmp_path, prefetch=0)
    for _ in range(7):
        assert learner.step() is not None
    assert learner.agent.seen == list(range(7))
    assert published == [(3, 3), (6, 6)]
    assert learner.version == 7


def _tiny_agent(seed: int) -> ChoreographerAgent:
    return ChoreographerAgent((24,), 6, load_config(["tiny"]).agent, seed=seed, device="cpu")


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    cfg = load_config(["tiny"]).learner
    batches = [random_batch(np.random.default_rng(i), (24,), 3, 6) for i in range(4)]
    it = iter(batches)
    learner = Learner(_tiny_agent(0), lambda: next(it), lambda w, v: None, cfg, tmp_path, prefetch=0)
    learner.step()
    learner.step()
    path = learner.save_checkpoint({"frames": 1234})
    assert path == tmp_path / CHECKPOINT

    it2 = iter(batches[2:])
    restored = Learner(_tiny_agent(7), lambda: next(it2), lambda w, v: None, cfg, tmp_path, prefetch=0)
    assert restored.load_checkpoint() == {"frames": 1234}
    assert restored.updates == 2
    a, b = learner.step(), restored.step()
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert drop(a) == drop(b)


def test_snapshots_are_written_once_per_configured_frame(tmp_path):
    cfg = dataclasses.replace(load_config(["tiny"]).learner, snapshot_frames=(100, 500))
    learner = Learner(_tiny_agent(0), lambda: None, lambda w, v: None, cfg, tmp_path, prefetch=0)
    assert learner.maybe_snapshot(99) is None
    path = learner.maybe_snapshot(120)
    assert path == tmp_path / "snapshots" / "snapshot_100.pt"
    assert learner.maybe_snapshot(130) is None
    assert learner.maybe_snapshot(600).name == "snapshot_500.pt"
    snapshot = torch.load(path, weights_only=True)
    assert snapshot["frames"] == 120 and "agent" in snapshot


def test_corrupted_checkpoint_names_the_file_and_is_left_alone(tmp_path):
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path}"):
        load_torch_file(path)
    assert path.read_bytes() == b"\x80\x04not a checkpoint"
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_torch_file(tmp_path / "missing.pt")
