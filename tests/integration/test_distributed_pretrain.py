"""`choreo pretrain` on a local Ray (loopback): 2 environment workers, 2 replay shards, the
learner actor; TensorBoard metrics, checkpoint, snapshot, advancing weight versions, resume."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo.buffer.shard import ReplayShard
from choreo.launch.runtime.config import from_yaml_file, load_config
from choreo.launch.runtime.distributed import drive, run_distributed
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT
from processes import start_endless_pretrain  # tests/integration is on sys.path

pytestmark = pytest.mark.slow


def measured_ratio(checkpoint: dict, batch_steps: int, action_repeat: int = 1) -> float:
    """Sampled steps trained on per step inserted after the warm-up, from the learner's update
    count and the frames collected (not from the limiter's bookkeeping)."""
    inserted = checkpoint["counters"]["frames"] // action_repeat - checkpoint["counters"]["limiter"]["min_size"]
    return checkpoint["updates"] * batch_steps / inserted


def test_ratio_holds_when_an_update_takes_longer_than_a_learner_call(tmp_path, monkeypatch):
    """A learner that needs 2 s per update (a learner call returns after 1 s), like a paper-size
    update on a CPU: the workers are held back so that what was trained on stays in the band."""
    monkeypatch.chdir(Path(__file__).parent)  # Ray's workers import slow_learner from here
    from slow_learner import UPDATE_SECONDS, SlowLearnerActor

    config = load_config(["tiny"], ["num_actors=2", "learner.total_frames=400", "learner.snapshot_frames=[]",
                                    "learner.checkpoint_minutes=1000"])
    run_dir = tmp_path / "slow"
    run_dir.mkdir()
    RunDir(run_dir).write_config(config)
    driver = drive(config, run_dir, learner_actor=SlowLearnerActor)
    assert driver.exit_code == 0
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    target, tolerance = config.replay.samples_per_insert, config.replay.tolerance
    assert checkpoint["updates"] >= 20 and driver.learner_train_seconds >= 20 * UPDATE_SECONDS
    ratio = measured_ratio(checkpoint, config.replay.batch_size * config.replay.batch_length)
    assert target * (1 - tolerance) <= ratio <= target * (1 + tolerance), ratio
    assert driver.summary()["ratio"] == pytest.approx(ratio)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.value for e in events.Scalars("replay/target_ratio")} == {target}
    logged = [e.value for e in events.Scalars("replay/ratio")]
    assert target * (1 - tolerance) <= logged[-1] <= target * (1 + tolerance), logged


def test_ray_pretrain_two_workers_two_shards_then_resume(tmp_path, capsys):
    cmd = [sys.executable, "-m", "choreo.launch.cli", "pretrain", "--preset", "tiny", "--logdir", str(tmp_path),
           "run_name=ray", "num_actors=2", "num_shards=2", "learner.total_frames=1500",
           "learner.snapshot_frames=[1000]", "replay.tolerance=0.05"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 workers x 1 envs, 2 shards, learner on cpu" in done.stdout
    run_dir = tmp_path / "ray"

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("world_model/loss", "codebook/window_active_codes", "skill_ac/actor/loss", "explore/actor/loss",
                "actors/0/steps_per_second", "actors/1/steps_per_second", "actors/steps_per_second",
                "replay/shard0/steps", "replay/shard1/steps", "replay/ratio", "actors/limiter_wait_s",
                "learner/limiter_wait_s", "learner/weight_version", "learner/data_wait_share", "actors/policy_lag",
                "throughput/frames_per_second", "throughput/updates_per_second"):
        assert tag in tags, tag
    versions = [e.value for e in events.Scalars("learner/weight_version")]
    assert versions[-1] > 0

    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["counters"]["frames"] >= 1500
    # One update per 10 frames after the warm-up (tiny: 100 steps), within the band (+-5%): what
    # was trained on, counted from the learner's own updates.
    assert 0.95 <= measured_ratio(checkpoint, 4 * 10) / 4.0 <= 1.05
    assert (run_dir / "snapshots" / "snapshot_1000.pt").exists()
    # The limiter's own ratio is that same ratio trained on.
    limiter = checkpoint["counters"]["limiter"]
    assert limiter["sampled"] == checkpoint["updates"] * 4 * 10
    assert limiter["wait_count"]["insert"] > 0 and limiter["wait_count"]["sample"] > 0

    # Each worker's chunks went to its own shard, and the acting weights' versions advanced.
    for i in range(2):
        shard = ReplayShard(10000, seed=0, name=f"shard{i}")
        shard.load(RunDir(run_dir).replay)
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
    assert "checkpoint written at " in out and f"; continue with: choreo pretrain --resume {run_dir}" in out
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]["frames"] > 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline()[:2] for p in alive]
