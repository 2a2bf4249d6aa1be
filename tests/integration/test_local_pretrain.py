"""`choreo pretrain --local` end to end on walker with tiny models: run directory, TensorBoard
events, checkpoint, snapshot, replay on disk, and --resume continuing from them."""

from __future__ import annotations

import dataclasses
import glob
import subprocess
import sys

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo.buffer.shard import ReplayShard
from choreo.launch.runtime.config import from_yaml_file, load_config
from choreo.launch.runtime.local import run_local
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT


def _scalar_tags(run_dir) -> set[str]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_local_pretrain_writes_run_directory_and_resumes(tmp_path, capsys):
    cmd = [sys.executable, "-m", "choreo.launch.cli", "pretrain", "--local", "--preset", "tiny", "--logdir", str(tmp_path),
           "run_name=walker", "learner.total_frames=1200", "learner.snapshot_frames=[1000]"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "walker"
    assert from_yaml_file(run_dir / "config.yaml") == load_config(["tiny"], [*cmd[-3:], f"logdir={tmp_path}"])
    assert (run_dir / "snapshots" / "snapshot_1000.pt").exists()
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["counters"]["frames"] == 1200
    assert checkpoint["updates"] > 50
    tags = _scalar_tags(run_dir)
    for tag in ("world_model/loss", "codebook/window_active_codes", "explore/actor/loss", "skill_ac/actor/loss",
                "replay/steps", "replay/ratio", "learner/weight_version", "actors/policy_lag",
                "actors/steps_per_second", "throughput/frames_per_second"):
        assert tag in tags, tag
    shard = ReplayShard(20000, seed=0)
    shard.load(RunDir(run_dir).replay)
    held = shard.stats()["steps"]
    assert held >= 1200

    # The same run again refuses to overwrite it.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stderr

    # Resume for longer: frames and updates continue from the checkpoint, replay comes back.
    config = dataclasses.replace(
        from_yaml_file(run_dir / "config.yaml"),
        learner=dataclasses.replace(from_yaml_file(run_dir / "config.yaml").learner, total_frames=1600))
    capsys.readouterr()
    assert run_local(config, run_dir, resume=True) == 0
    out = capsys.readouterr().out
    assert f"resumed {run_dir} at 1,200 frames, {checkpoint['updates']:,} updates, {held:,} steps in replay" in out
    resumed = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert resumed["counters"]["frames"] == 1600
    assert resumed["updates"] > checkpoint["updates"]
    assert len(glob.glob(str(run_dir / "tensorboard" / "events.*"))) >= 1


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "choreo.launch.cli", "pretrain", "--local", "--preset", "tiny", "--logdir", str(tmp_path),
           "run_name=term", "learner.total_frames=10000000", "learner.checkpoint_minutes=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "term"
    deadline = time.monotonic() + 120
    while not (run_dir / "tensorboard").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # let it collect and train for a while
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"continue with: choreo pretrain --local --resume {run_dir}" in out
    counters = torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]
    assert counters["frames"] > 0
    assert (RunDir(run_dir).replay / "shard0.msgpack").exists()
