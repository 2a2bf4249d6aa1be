"""The pieces of fault recovery that need no Ray: a restarted replay shard restores its last
checkpoint (and says what it restored), and `state_digest` tells bit-identical states apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import choreo.launch.runtime.ray_runtime as ray_runtime
from choreo.launch.runtime.distributed import state_digest
from choreo.launch.runtime.ray_runtime import ShardActor
from test_shard import simple_chunk  # tests/unit is on sys.path (rootdir-relative imports)


@pytest.fixture
def restarted(monkeypatch):
    """Makes the next ShardActor believe Ray restarted its process."""
    monkeypatch.setattr(ray_runtime, "_reconstructed", lambda: True)


def _fresh(tmp_path, monkeypatch, capacity=500) -> ShardActor:
    monkeypatch.setattr(ray_runtime, "_reconstructed", lambda: False)
    return ShardActor(capacity, seed=0, name="shard0", replay_dir=str(tmp_path))


def test_first_start_is_empty_even_with_a_checkpoint_on_disk(tmp_path, monkeypatch):
    shard = _fresh(tmp_path, monkeypatch)
    shard.add_chunks([(0, simple_chunk(50))])
    shard.save_checkpoint()
    again = _fresh(tmp_path, monkeypatch)
    assert again.stats()["steps"] == 0 and again.info()["restored_inserted"] == 0


def test_restarted_shard_loads_its_checkpoint_and_reports_what_it_restored(tmp_path, monkeypatch):
    shard = _fresh(tmp_path, monkeypatch)
    steps, incarnation = shard.add_chunks([(0, simple_chunk(50)), (1, simple_chunk(30))])
    assert steps == 80 and incarnation == shard.incarnation
    shard.save_checkpoint()
    shard.add_chunks([(0, simple_chunk(20, first=False, start=50))])  # after the checkpoint: lost

    monkeypatch.setattr(ray_runtime, "_reconstructed", lambda: True)
    back = ShardActor(500, seed=0, name="shard0", replay_dir=str(tmp_path))
    info = back.info()
    assert info["incarnation"] != shard.incarnation
    assert info["restored_inserted"] == 80 and info["restore_error"] is None
    assert back.stats()["steps"] == 80
    rows = back.sample(4, 10, np.random.default_rng(0))
    assert rows["observation"].shape == (4, 10, 4)


def test_restarted_shard_without_checkpoint_starts_empty(tmp_path, restarted):
    shard = ShardActor(500, seed=0, name="shard0", replay_dir=str(tmp_path))
    assert shard.stats()["steps"] == 0
    assert shard.info()["restored_inserted"] == 0 and shard.info()["restore_error"] is None


def test_restarted_shard_with_a_corrupted_checkpoint_starts_empty_says_why_and_keeps_the_file(
        tmp_path, monkeypatch):
    shard = _fresh(tmp_path, monkeypatch)
    shard.add_chunks([(0, simple_chunk(50))])
    path = shard.save(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    monkeypatch.setattr(ray_runtime, "_reconstructed", lambda: True)
    back = ShardActor(500, seed=0, name="shard0", replay_dir=str(tmp_path))
    assert back.stats()["steps"] == 0
    assert "shard0.msgpack" in back.info()["restore_error"]
    assert path.read_bytes() == bytes(raw)  # left for the user to inspect, not deleted


def test_resume_requires_the_checkpoint(tmp_path, monkeypatch):
    shard = _fresh(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError):
        shard.resume()


def test_state_digest_is_equal_for_equal_states_and_differs_for_one_bit():
    state = {"net": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(3)},
             "opt": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "rng": torch.ByteTensor([1, 2, 3]), "counter": 7}
    same = {"rng": state["rng"].clone(), "counter": 7, "opt": {"param_groups": [{"params": [0], "lr": 1e-3}],
            "state": {0: {"exp_avg": torch.zeros(3)}}}, "net": {"step": torch.tensor(3), "w": state["net"]["w"].clone()}}
    assert state_digest(state) == state_digest(same)
    flipped = state["net"]["w"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # the lowest mantissa bit of one weight
    assert state_digest({**state, "net": {**state["net"], "w": flipped}}) != state_digest(state)
    assert state_digest({**state, "counter": 8}) != state_digest(state)
    assert state_digest({**state, "opt": {**state["opt"], "param_groups": [{"lr": 2e-3, "params": [0]}]}}) \
        != state_digest(state)
