"""Offline and mixed pretraining on a local Ray with tiny models: a dataset loaded into two shard
actors, an offline-only run that trains by update count with pictures in TensorBoard, a mixed run
that keeps collecting after the dataset, and `choreo export` of its replay loaded back bit for bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo.buffer.dataset import EpisodeSpec, NpzFolder, episode_files, load_into
from choreo.buffer.shard import ReplayShard
from choreo.launch import cli
from choreo.launch.runtime.build import make_shard
from choreo.launch.runtime.config import from_yaml_file
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Six ExORL-style walker episodes of 60 steps (random states and actions)."""
    folder = tmp_path_factory.mktemp("exorl") / "walker" / "rnd" / "buffer"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        action = rng.uniform(-1, 1, (60, 6)).astype(np.float32)
        action[0] = 0
        np.savez(folder / f"20220101T000000_{i}_60.npz", observation=rng.normal(size=(60, 24)).astype(np.float32),
                 action=action, reward=np.zeros((60, 1), np.float32), discount=np.ones((60, 1), np.float32))
    return folder.parents[1]


def digests(episodes) -> list[str]:
    return sorted(hashlib.sha256(b"".join(np.ascontiguousarray(e[k]).tobytes() for k in sorted(e))).hexdigest()
                  for e in episodes)


def test_offline_only_on_ray_trains_by_updates_with_pictures(tmp_path, dataset, capsys):
    assert cli.main(["pretrain", "--offline", str(dataset), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=off", "num_shards=2", "learner.total_updates=30", "learner.snapshot_updates=[10]",
                     "monitor.media_every=15", "agent.choreographer.num_codes=4"]) == 0
    out = capsys.readouterr().out
    assert "loaded 6 episodes, 360 steps" in out and "0 files skipped" in out
    assert "no workers (offline), 2 shards" in out
    run_dir = tmp_path / "off"
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["snapshot_10updates.pt",
                                                                         "snapshot_30updates.pt"]
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["updates"] == 30 and checkpoint["counters"]["frames"] == 0
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"skill_ac/videos", "codebook/plot"} <= set(events.Tags()["images"])
    assert max(e.step for e in events.Scalars("world_model/loss")) <= 30  # the x axis is updates


def test_mixed_run_collects_after_the_dataset_and_exports_bit_for_bit(tmp_path, dataset, capsys):
    assert cli.main(["pretrain", "--offline", str(dataset), "--collect", "--preset", "tiny", "--logdir",
                     str(tmp_path), "run_name=mix", "num_shards=2", "learner.total_frames=600"]) == 0
    run_dir = tmp_path / "mix"
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    counters = checkpoint["counters"]
    assert counters["dataset_steps"] == 360 and counters["frames"] >= 600
    assert counters["limiter"]["inserted"] >= 360 + 600 and checkpoint["updates"] > 0
    capsys.readouterr()

    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    config = from_yaml_file(run_dir / "config.yaml")
    replay = []
    for i in range(config.num_shards):
        shard = make_shard(config, i)
        shard.load(RunDir(run_dir).replay)
        replay.extend(shard.episodes())
    assert sum(len(e["observation"]) for e in replay) >= 360 + 600
    back = ReplayShard(10_000, seed=0)
    summary = load_into(back, NpzFolder(tmp_path / "export"), episode_files(tmp_path / "export"), EpisodeSpec((24,), 6))
    assert summary.skipped == [] and summary.steps == sum(len(e["observation"]) for e in replay)
    assert digests(back.episodes()) == digests(replay)
