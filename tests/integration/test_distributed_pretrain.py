"""`choreo pretrain` on a local Ray (loopback): 2 environment workers, 2 replay shards, the
learner actor; TensorBoard metrics, checkpoint, snapshot, advancing weight versions, resume."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo.buffer.shard import ReplayShard
from choreo.launch.config import from_yaml_file
from choreo.launch.distributed import run_distributed
from choreo.launch.local import REPLAY_DIR
from choreo.learner.learner import CHECKPOINT
from processes import start_endless_pretrain  # tests/integration is on sys.path

pytestmark = pytest.mark.slow


def test_ray_pretrain_two_workers_two_shards_then_resume(tmp_path, capsys):
    cmd = [sys.executable, "-m", "choreo.launch.cli", "pretrain", "--preset", "tiny", "--logdir", str(tmp_path),
           "run_name=ray", "num_actors=2", "num_shards=2", "learner.total_frames=1500",
           "learner.snapshot_frames=[1000]", "replay.tolerance=0.05"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 environment workers x 1 envs, 2 replay shards, learner on cpu" in done.stdout
    run_dir = tmp_path / "ray"

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("world_model/loss", "skills/window_active_codes", "skill/actor/loss", "explore/actor/loss",
                "actors/0/steps_per_second", "actors/1/steps_per_second", "actors/steps_per_second",
                "replay/shard0/steps", "replay/shard1/steps", "replay/ratio", "limiter/insert_wait_s",
                "limiter/sample_wait_s", "learner/weight_version", "learner/data_wait_share", "actors/policy_lag",
                "throughput/frames_per_second", "throughput/updates_per_second"):
        assert tag in tags, tag
    versions = [e.value for e in events.Scalars("learner/weight_version")]
    assert versions[-1] > 0

    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["counters"]["frames"] >= 1500
    # One update per 10 frames after the warm-up (tiny: 100 steps), give or take the grants in flight.
    assert 100 <= checkpoint["updates"] <= 160
    assert (run_dir / "snapshots" / "snapshot_1000.pt").exists()
    # The limiter held the sampled/inserted ratio (after the warm-up) within 10% of its target
    # (its band here is +-5%: a learner-bound run sits at the lower edge of the band).
    limiter = checkpoint["counters"]["limiter"]
    ratio = limiter["sampled"] / (limiter["inserted"] - limiter["min_size"])
    assert abs(ratio / limiter["samples_per_insert"] - 1) <= 0.1, ratio
    assert limiter["wait_count"]["insert"] > 0 and limiter["wait_count"]["sample"] > 0

    # Each worker's chunks went to its own shard, and the acting weights' versions advanced.
    for i in range(2):
        shard = ReplayShard(10000, seed=0, name=f"shard{i}")
        shard.load(run_dir / REPLAY_DIR)
        assert shard.stats()["steps"] >= 500
        batch = shard.sample(16, 10, np.random.default_rng(0))
        assert batch["policy_version"].max() > 0

    config = from_yaml_file(run_dir / "config.yaml")
    config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, total_frames=2000))
    capsys.readouterr()
    assert run_distributed(config, run_dir, resume=True) == 0
    assert f"resumed at {checkpoint['counters']['frames']:,} frames" in capsys.readouterr().out
    resumed = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert resumed["counters"]["frames"] >= 2000
    assert resumed["updates"] > checkpoint["updates"]


def test_sigterm_checkpoints_and_stops_every_ray_process(tmp_path):
    import signal

    proc, run_dir, children = start_endless_pretrain(tmp_path, "term")
    import psutil  # importable once ray is (start_endless_pretrain imports it)

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"checkpoint written; continue with: choreo pretrain --resume {run_dir}" in out
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]["frames"] > 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline()[:2] for p in alive]
