"""Faults a pretraining run on Ray must survive: worker, shard and learner processes killed, an
environment that raises, a loss that turns NaN, and Ctrl-C or SIGTERM to the whole process group. Tiny
models on a local Ray (loopback); the driver runs in the test process, and `on_tick` injects the
faults at chosen frame counts."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo.buffer.shard import ReplayShard
from choreo.launch.runtime.config import load_config
from choreo.launch.runtime.distributed import drive, run_distributed, state_digest
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT
from processes import start_endless_pretrain  # tests/integration is on sys.path

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _faulty_envs_importable(monkeypatch):
    """Ray puts the driver's working directory on its workers' sys.path: running from this test
    directory puts `faulty_envs` within their reach (and the driver's)."""
    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _run_dir(tmp_path: Path, overrides: list[str]):
    config = load_config(["tiny"], ["num_actors=2", "num_shards=2", "learner.checkpoint_minutes=1000", *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).write_config(config)
    return config, run_dir


def _tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_killed_worker_shard_and_learner_are_restarted_and_the_run_finishes(tmp_path):
    config, run_dir = _run_dir(tmp_path, ["learner.total_frames=3000", "learner.snapshot_frames=[600]"])
    seen: dict = {}

    def inject(driver) -> None:
        if not (run_dir / CHECKPOINT).exists():
            return  # every fault comes after the first checkpoint (written with the 600-frame snapshot)
        if "runner" not in seen and driver.frames >= 800:
            seen["runner"] = driver.pids()["runners"][1]
            os.kill(seen["runner"], signal.SIGKILL)
        elif "shard" not in seen and driver.frames >= 1200 and sum(driver.runner_restarts):
            saved = ReplayShard(config.replay.capacity // config.num_shards, seed=0, name="shard0")
            saved.load(RunDir(run_dir).replay)
            seen["shard_checkpoint_inserted"] = saved.stats()["steps_inserted"]
            seen["shard_acked"] = driver.shard_acked[0]
            seen["shard"] = driver.pids()["shards"][0]
            os.kill(seen["shard"], signal.SIGKILL)
        elif "learner" not in seen and driver.frames >= 1800 and sum(driver.shard_restarts):
            shutil.copy(run_dir / CHECKPOINT, tmp_path / "before_kill.pt")
            seen["learner"] = driver.pids()["learner"]
            os.kill(seen["learner"], signal.SIGKILL)

    driver = drive(config, run_dir, on_tick=inject)
    assert driver.exit_code == 0
    assert {"runner", "shard", "learner"} <= set(seen), seen

    # The worker came back in a new process, got the current weights and went on collecting.
    assert driver.runner_restarts[1] >= 1
    assert driver.pids()["runners"][1] != seen["runner"]
    assert driver.runner_versions[1] > 0

    # The shard reloaded its checkpoint; the steps it had acknowledged since then are the ones lost
    # (plus at most the one call of its worker in flight when it died).
    assert driver.shard_restarts[0] == 1
    lost_since_checkpoint = seen["shard_acked"] - seen["shard_checkpoint_inserted"]
    assert lost_since_checkpoint > 0
    call_steps = config.replay.chunk_length * config.envs_per_actor
    assert lost_since_checkpoint <= driver.steps_lost <= lost_since_checkpoint + call_steps

    # The new learner started from the checkpoint bit for bit; frames never went backwards.
    assert driver.learner_restarts == 1
    restart = [e for e in driver.restart_log if e["role"] == "learner"][0]
    before = torch.load(tmp_path / "before_kill.pt", weights_only=True)
    assert restart["digest"] == state_digest(before["agent"])
    assert restart["updates"] == before["updates"]
    assert restart["frames"] >= 1800
    final = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert final["counters"]["frames"] >= 3000
    assert final["updates"] > before["updates"]

    tags = _tags(run_dir)
    for tag in ("actors/restarts", "actors/1/restarts", "replay/restarts", "replay/steps_lost", "learner/restarts"):
        assert tag in tags, tag


def test_environment_that_raises_gets_its_worker_restarted(tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("CHOREO_TEST_CRASH_MARKER", str(marker))
    config, run_dir = _run_dir(tmp_path, ["env.task=gym:faulty_envs:CrashOnce-v0", "learner.total_frames=1500",
                                          "learner.snapshot_frames=[]"])
    driver = drive(config, run_dir)
    assert driver.exit_code == 0
    assert marker.exists()
    assert sum(driver.runner_restarts) == 1
    assert driver.frames >= 1500
    assert "actors/restarts" in _tags(run_dir)


def test_environment_that_always_raises_stops_the_run_with_the_reason(tmp_path, capsys):
    config, run_dir = _run_dir(tmp_path, ["env.task=gym:faulty_envs:CrashAlways-v0", "learner.total_frames=1500",
                                          "learner.snapshot_frames=[]"])
    assert run_distributed(config, run_dir) == 1
    out = capsys.readouterr().out
    assert "the run stopped: environment worker" in out
    assert "failed 5 times in a row" in out and "simulated environment failure" in out


def _signal_the_process_group(tmp_path: Path, signum: int, run_name: str) -> tuple[Path, dict]:
    """Start `choreo pretrain` (tiny, embedded Ray) in a process group of its own, as a terminal or a
    scheduler (`timeout`, SLURM) starts a job; once it wrote a periodic checkpoint and trained on,
    send `signum` to the whole group, as Ctrl-C (SIGINT) or the scheduler (SIGTERM) does. Checks
    that the driver wrote a final checkpoint after the signal, beyond the periodic one, exited 130,
    and that no process of its Ray is left; returns the run directory and that final checkpoint."""
    proc, run_dir, children = start_endless_pretrain(tmp_path, run_name, new_session=True,
                                                     overrides=("learner.snapshot_frames=[400]",))
    import psutil  # importable once ray is (start_endless_pretrain imports it)

    try:
        # Ray's processes run in sessions of their own (launch/runtime/ray_runtime.py): the group's signal
        # reaches the driver only. The workers that the raylet starts later join the raylet's session.
        assert all(os.getpgid(p.pid) != proc.pid for p in children), "a Ray process is in the driver's group"
        ray_sessions = {os.getsid(p.pid) for p in children} - {os.getsid(proc.pid)}
        assert ray_sessions
        deadline = time.monotonic() + 120
        while not (run_dir / CHECKPOINT).exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {proc.communicate()[1][-3000:]}")
        assert (run_dir / CHECKPOINT).exists(), "no periodic checkpoint within 120 s"
        time.sleep(3)  # train on past the periodic checkpoint
        periodic = torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]["frames"]
        signalled_at = time.time()
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed check above: do not leave the run behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    written = re.search(rf"checkpoint written at [\d,]+ frames; continue with: choreo pretrain --resume "
                        rf"{re.escape(str(run_dir))}\n", out)
    assert written, out[-3000:]
    assert "could not write" not in out
    assert (run_dir / CHECKPOINT).stat().st_mtime >= signalled_at
    final = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert final["counters"]["frames"] >= periodic > 0

    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline()[:2] for p in alive]
    left = []  # also the workers started after `children` was taken: every process of Ray's sessions
    for p in psutil.process_iter(["name"]):
        try:
            if os.getsid(p.pid) in ray_sessions:
                left.append((p.pid, p.info["name"]))
        except (ProcessLookupError, PermissionError):
            continue
    assert left == [], left
    return run_dir, final


def test_ctrl_c_to_the_process_group_checkpoints_stops_everything_and_resumes(tmp_path):
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the driver and
    # every process it started.
    run_dir, interrupted = _signal_the_process_group(tmp_path, signal.SIGINT, "ctrl-c")
    frames = interrupted["counters"]["frames"]
    from choreo.launch.runtime.config import from_yaml_file

    config = from_yaml_file(run_dir / "config.yaml")
    config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, total_frames=frames + 400))
    assert run_distributed(config, run_dir, resume=True) == 0
    resumed = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert resumed["counters"]["frames"] >= frames + 400
    assert resumed["updates"] > interrupted["updates"]
    assert np.isfinite(resumed["counters"]["limiter"]["sampled"])


def test_sigterm_to_the_process_group_checkpoints_and_stops_everything(tmp_path):
    # Schedulers (`timeout`, SLURM's scancel) send SIGTERM to every process of the job's group.
    _signal_the_process_group(tmp_path, signal.SIGTERM, "sigterm")


def test_losses_that_stay_nan_stop_the_run_and_leave_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "nan"
    monkeypatch.setenv("CHOREO_TEST_NAN_MARKER", str(marker))
    # A small replay, so that NaN observations soon fill every batch.
    config, run_dir = _run_dir(tmp_path, ["env.task=gym:faulty_envs:NaNObs-v0", "learner.total_frames=1000000",
                                          "learner.snapshot_frames=[600]", "learner.max_nonfinite_updates=5",
                                          "replay.capacity=600"])
    good: dict = {}

    def poison(driver) -> None:
        if not marker.exists() and (run_dir / CHECKPOINT).exists():
            good["bytes"] = (run_dir / CHECKPOINT).read_bytes()
            good["updates"] = driver.updates
            marker.touch()

    driver = drive(config, run_dir, on_tick=poison)
    assert driver.exit_code == 1
    out = capsys.readouterr().out
    assert "the run stopped: " in out and "updates in a row were non-finite" in out
    assert "learner.max_nonfinite_updates=5" in out
    assert (run_dir / CHECKPOINT).read_bytes() == good["bytes"]
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)["agent"]
    tensors = []

    def collect(x):
        if isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            tensors.append(x)

    collect(state)
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
