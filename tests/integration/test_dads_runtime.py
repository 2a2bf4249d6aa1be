"""DADS on the runtime, end to end with small networks: `algo=dads` pretraining on a local Ray
(workers storing skills and behaviour log-probabilities, the learner's DADS metrics in
TensorBoard), `choreo plan` on Ray workers, and planning on point-mass navigation that ends closer
to the goals than random skills."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo import vocabulary as B
from choreo.launch import cli
from choreo.launch.runtime.build import make_shard
from choreo.launch.runtime.config import from_yaml_file
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT

pytestmark = pytest.mark.slow

DADS = ["algo=dads", "task=point_mass_nav", "agent.dads.hidden=64", "agent.dads.prior_samples=16",
        "replay.min_size=1000"]


def plan(tmp_path: Path, snapshot: Path, policy: str, *extra: str) -> dict:
    assert cli.main(["plan", "--snapshot", str(snapshot), "--episodes", "20", "--policy", policy, "--logdir",
                     str(tmp_path / "plans"), *extra, "task=point_mass_nav"]) == 0
    newest = max((tmp_path / "plans").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return json.loads((newest / "plan.json").read_text())


def test_dads_pretrains_on_ray_and_plans_on_ray_workers(tmp_path):
    assert cli.main(["pretrain", "--preset", "tiny", "--logdir", str(tmp_path), "run_name=dads", *DADS,
                     "learner.total_frames=3000", "learner.snapshot_frames=[3000]"]) == 0
    run_dir = tmp_path / "dads"
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["updates"] > 50 and checkpoint["counters"]["frames"] >= 3000

    config = from_yaml_file(run_dir / "config.yaml")
    shard = make_shard(config, 0)
    shard.load(RunDir(run_dir).replay)
    batch = shard.sample(64, 2, rng=0)
    assert batch[B.SKILL_VECTOR].shape == (64, 2, 2) and batch[B.BEHAVIOUR_LOGP].shape == (64, 2)
    acted = batch[B.POLICY_VERSION] >= 0
    assert acted.any() and np.isfinite(batch[B.BEHAVIOUR_LOGP]).all()
    assert (np.abs(batch[B.SKILL_VECTOR][acted]) <= 1).all() and (batch[B.SKILL_VECTOR][acted] != 0).any()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"dynamics/log_prob", "dads/reward", "sac/critic/loss", "sac/actor/loss", "sac/alpha",
            "dynamics/importance_weight", "episode/xy_spread", "episode/xy_distance"} <= tags

    summary = plan(tmp_path, run_dir / "snapshots" / "snapshot_3000.pt", "plan")  # on an embedded Ray
    assert summary["episodes"] == 20 and summary["algo"] == "dads" and np.isfinite(summary["normalised_distance"])


def test_planning_ends_closer_to_the_goal_than_random_skills(tmp_path):
    # In one process: deterministic for a seed, so the comparison is the same at every run.
    assert cli.main(["pretrain", "--local", "--preset", "tiny", "--logdir", str(tmp_path), "run_name=dads", *DADS,
                     "learner.total_frames=10000", "learner.snapshot_frames=[10000]"]) == 0
    snapshot = tmp_path / "dads" / "snapshots" / "snapshot_10000.pt"
    planned = plan(tmp_path, snapshot, "plan", "--local")
    random = plan(tmp_path, snapshot, "random", "--local")
    assert planned["normalised_distance"] < random["normalised_distance"], (planned, random)
    assert planned["final_distance"] < random["final_distance"]
