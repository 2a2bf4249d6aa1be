"""Two learner ranks on a local Ray (loopback, gloo on CPUs) train one tiny agent: they stay bit
for bit in step, a killed rank restarts the whole group from the last checkpoint, and a resume
with the same number of ranks restores every rank's state exactly."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal

import pytest
import torch

from choreo.launch.runtime.config import load_config
from choreo.launch.runtime.distributed import drive, state_digest
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT

pytestmark = pytest.mark.slow


def rank_digest(checkpoint: dict, rank: int) -> str:
    """The digest rank `rank`'s agent has right after loading `checkpoint`: rank 0's state, with
    that rank's own generator."""
    agent = dict(checkpoint["agent"])
    if rank:
        extra = dict(agent["_extra_state"])
        extra["generator"] = checkpoint["ranks"][rank - 1]["generator"]
        agent["_extra_state"] = extra
    return state_digest(agent)


def test_two_ranks_in_step_survive_a_killed_rank_and_resume_exactly(tmp_path):
    config = load_config(["tiny"], ["num_actors=1", "num_shards=2", "learner.num_learners=2", "learner.threads=0",
                                    "learner.total_frames=2400", "learner.snapshot_frames=[600]",
                                    "learner.checkpoint_minutes=1000"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).write_config(config)
    seen: dict = {}

    def inject(driver) -> None:
        if "in_step" not in seen and driver.updates >= 5:
            seen["in_step"] = driver.learner.digests()
        elif "killed" not in seen and (run_dir / CHECKPOINT).exists() and driver.frames >= 1200:
            shutil.copy(run_dir / CHECKPOINT, tmp_path / "before_kill.pt")
            seen["killed"] = driver.pids()["learner_ranks"][1]
            os.kill(seen["killed"], signal.SIGKILL)
        elif "killed" in seen and "after" not in seen and driver.learner_restarts and driver.updates >= 5 + \
                seen.setdefault("restarted_at", driver.updates):
            seen["after"] = driver.learner.digests()

    driver = drive(config, run_dir, on_tick=inject)
    assert driver.exit_code == 0
    assert {"in_step", "killed", "after"} <= set(seen), seen
    # The two ranks share this node: each took half its cores (learner.threads=0).
    assert [r["threads"] for r in driver.learner_ranks] == [max(1, (os.cpu_count() or 1) // 2)] * 2
    a, b = seen["in_step"]
    assert a == b, "the two ranks' agents differ"
    assert seen["after"][0] == seen["after"][1], "the restarted ranks drifted apart"

    # The whole group restarted from the checkpoint: every rank with its own saved state.
    assert driver.learner_restarts == 1
    assert seen["killed"] not in driver.pids()["learner_ranks"]
    before = torch.load(tmp_path / "before_kill.pt", weights_only=True)
    restart = [e for e in driver.restart_log if e["role"] == "learner"][0]
    assert restart["digests"] == [rank_digest(before, 0), rank_digest(before, 1)]
    assert restart["digests"][0] != restart["digests"][1], "the ranks' generators are their own"

    final = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert final["learners"] == 2 and len(final["ranks"]) == 1
    assert final["updates"] > before["updates"]
    assert (run_dir / "snapshots" / "snapshot_600.pt").exists()
    # The limiter counted both ranks' batches: updates x 2 ranks x batch steps sampled.
    sampled = final["counters"]["limiter"]["sampled"]
    assert sampled == final["updates"] * 2 * config.replay.batch_size * config.replay.batch_length

    # Resumed with two ranks: each starts exactly where the checkpoint left it.
    longer = dataclasses.replace(config, learner=dataclasses.replace(config.learner, total_frames=2800))
    RunDir(run_dir).write_config(longer)
    resumed = drive(longer, run_dir, resume=True)
    assert resumed.exit_code == 0
    assert resumed.learner_restored == [rank_digest(final, 0), rank_digest(final, 1)]
    # Each rank's sampler goes on after the batches trained on, not from the run's first draws.
    assert final["batches"] >= final["updates"] > 0
    assert [r["sampler_position"] for r in resumed.learner_ranks] == [final["batches"]] * 2
    assert resumed.frames >= 2800


def test_a_hung_rank_times_out_and_the_group_restarts(tmp_path):
    """A rank that stops answering (SIGSTOP: alive, but never reaches the next collective) makes
    the other rank's collective time out after learner.group_timeout_s; the driver then kills
    both and starts the group again from the checkpoint."""
    config = load_config(["tiny"], ["num_actors=1", "learner.num_learners=2", "learner.threads=1",
                                    "learner.total_frames=1600", "learner.snapshot_frames=[400]",
                                    "learner.checkpoint_minutes=1000", "learner.group_timeout_s=5"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).write_config(config)
    seen: dict = {}

    def inject(driver) -> None:
        if "stopped" not in seen and (run_dir / CHECKPOINT).exists() and driver.updates >= 10:
            seen["stopped"] = driver.pids()["learner_ranks"][1]
            os.kill(seen["stopped"], signal.SIGSTOP)

    driver = drive(config, run_dir, on_tick=inject)
    assert driver.exit_code == 0
    assert "stopped" in seen
    assert driver.learner_restarts == 1
    assert seen["stopped"] not in driver.pids()["learner_ranks"]
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]["frames"] >= 1600
