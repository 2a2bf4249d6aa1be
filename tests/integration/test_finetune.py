"""`choreo finetune` and `choreo evaluate` end to end with tiny models: a pretraining snapshot, then
fine-tuning on a local Ray with evaluations at frame 0 and every `eval.every_frames`; the same from
scratch and with frozen skills; snapshots that do not fit are refused before anything starts;
zero-shot evaluation of the skills and of random actions on Ray workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from choreo.launch import cli
from choreo.launch.runtime.config import load_config
from choreo.launch.runtime.local import run_local
from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT

pytestmark = pytest.mark.slow

FINETUNE = ["learner.total_frames=400", "eval.every_frames=200", "eval.episodes=2"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain")
    config = load_config(["tiny"], ["learner.total_frames=1100", "learner.snapshot_frames=[1000]"])
    RunDir(run_dir).write_config(config)
    assert run_local(config, run_dir) == 0
    return run_dir / "snapshots" / "snapshot_1000.pt"


def finetune(tmp_path: Path, snapshot: Path | None, *overrides: str, name: str = "ft") -> tuple[int, Path]:
    start = ["--snapshot", str(snapshot)] if snapshot else ["--from-scratch"]
    code = cli.main(["finetune", *start, "--preset", "tiny", "--logdir", str(tmp_path), f"run_name={name}",
                     "task=walker_run", *FINETUNE, *overrides])
    return code, tmp_path / name


def evaluations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def actor(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def test_finetune_on_ray_evaluates_and_trains_the_skills(tmp_path, snapshot):
    cmd = [sys.executable, "-m", "choreo.launch.cli", "finetune", "--snapshot", str(snapshot), "--preset", "tiny",
           "--logdir", str(tmp_path), "run_name=ft", "task=walker_run", *FINETUNE]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ft"
    evals = evaluations(run_dir)
    assert [e["frame"] for e in evals][:1] == [0] and len(evals) == 3
    assert evals[-1]["frame"] >= 400 and evals[1]["frame"] >= 200
    for e in evals:
        assert e["task"] == "walker_run" and e["seed"] == 0 and e["mode"] == "finetune"
        assert len(e["returns"]) == 2 and e["mean_return"] == pytest.approx(sum(e["returns"]) / 2)
    assert "evaluation at 0 frames: return" in done.stdout

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/return")] == [e["frame"] for e in evals]
    assert "meta/gate_open" in events.Tags()["scalars"]

    pretrained = torch.load(snapshot, weights_only=True)["agent"]
    tuned = torch.load(run_dir / CHECKPOINT, weights_only=True)["agent"]
    assert bool(tuned["finetuning"]) and bool(tuned["gate_open"])  # walker_run pays from the first steps
    assert any(not torch.equal(v, pretrained[k]) for k, v in actor(tuned, "skill_ac.actor.").items())
    # The pretrained networks were the starting point: the skill codebook is the snapshot's (the
    # skill auto-encoder does not train in fine-tuning).
    assert torch.equal(tuned["skills.codebook"], pretrained["skills.codebook"])


def test_frozen_skills_train_only_the_meta_controller(tmp_path, snapshot):
    code, run_dir = finetune(tmp_path, snapshot, "agent.finetune.freeze_skills=true")
    assert code == 0
    pretrained = torch.load(snapshot, weights_only=True)["agent"]
    tuned = torch.load(run_dir / CHECKPOINT, weights_only=True)["agent"]
    assert bool(tuned["gate_open"])
    skill_actor = actor(tuned, "skill_ac.actor.")
    assert skill_actor and all(torch.equal(v, pretrained[k]) for k, v in skill_actor.items())
    assert len(evaluations(run_dir)) == 3


def test_from_scratch_runs_the_same_protocol(tmp_path, snapshot):
    code, run_dir = finetune(tmp_path, None, name="scratch")
    assert code == 0
    evals = evaluations(run_dir)
    assert len(evals) == 3 and {e["mode"] for e in evals} == {"scratch"}
    pretrained = torch.load(snapshot, weights_only=True)["agent"]
    tuned = torch.load(run_dir / CHECKPOINT, weights_only=True)["agent"]
    assert bool(tuned["finetuning"])
    assert not torch.equal(tuned["skills.codebook"], pretrained["skills.codebook"])  # random, not the snapshot's


@pytest.mark.parametrize("override, named", [
    ("agent.world_model.deter=16", "agent.world_model.deter"),
    ("env.task=quadruped_walk", "env.task"),
])
def test_a_snapshot_that_does_not_fit_is_refused_before_anything_starts(tmp_path, snapshot, capsys, override,
                                                                         named):
    code = cli.main(["finetune", "--snapshot", str(snapshot), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=bad", *FINETUNE, override])
    assert code == 2
    err = capsys.readouterr().err
    assert str(snapshot) in err and named in err, err
    assert not (tmp_path / "bad").exists()  # nothing was created


def test_finetune_needs_a_starting_point(tmp_path, capsys):
    assert cli.main(["finetune", "--preset", "tiny", "--logdir", str(tmp_path)]) == 2
    assert "--snapshot FILE" in capsys.readouterr().err
    assert cli.main(["finetune", "--snapshot", str(tmp_path / "missing.pt"), "--logdir", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_zero_shot_evaluation_of_skills_and_random_actions_on_ray(tmp_path, snapshot, capsys):
    code = cli.main(["evaluate", "--snapshot", str(snapshot), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=skills", "task=walker_walk", "--episodes", "3"])
    assert code == 0
    summary = json.loads((tmp_path / "skills" / "zero_shot.json").read_text())
    assert summary["episodes"] == 3 and summary["policy"] == "skills" and summary["snapshot_frames"] == 1000
    lines = [json.loads(x) for x in (tmp_path / "skills" / "zero_shot.jsonl").read_text().splitlines()]
    assert sum(len(x["returns"]) for x in lines) == 3

    code = cli.main(["evaluate", "--policy", "random", "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=random", "env.task=mw_reach", "env.obs=states", "--goals", "0,5", "--episodes", "2"])
    assert code == 0
    summary = json.loads((tmp_path / "random" / "zero_shot.json").read_text())
    assert summary["goals"] == 2 and summary["episodes"] == 4 and summary["policy"] == "random"
    out = capsys.readouterr().out
    assert f"random actions: success {summary['success']:.3f} (mean over 2 goals" in out
    assert f"{summary['goals_found_any']} of 2 goals found in any episode" in out


def test_two_finetunings_side_by_side_have_separate_results(tmp_path, snapshot, capsys):
    """One command, two seeds: each run its own directory, learner and workers, in a placement group
    of its own on the local Ray; both finish with their own evaluations."""
    code = cli.main(["finetune", "--snapshot", str(snapshot), "--preset", "tiny", "--logdir", str(tmp_path),
                     "--tasks", "walker_run", "--seeds", "0,1", "--parallel", "2", "run_name=sweep",
                     "learner.total_frames=300", "eval.every_frames=300", "eval.episodes=2"])
    assert code == 0, capsys.readouterr()
    runs = {p.name: p for p in (tmp_path / "sweep").iterdir() if p.is_dir()}
    assert set(runs) == {"walker_run-seed0", "walker_run-seed1"}
    results = {name: evaluations(run_dir) for name, run_dir in runs.items()}
    for name, evals in results.items():
        assert [e["frame"] for e in evals][0] == 0 and len(evals) == 2, (name, evals)
        assert {e["seed"] for e in evals} == {int(name[-1])}
        assert (runs[name] / CHECKPOINT).exists() and (runs[name] / "driver.log").exists()
    # Different seeds: different evaluation episodes.
    assert results["walker_run-seed0"][0]["returns"] != results["walker_run-seed1"][0]["returns"]
    assert "done" in capsys.readouterr().err


def test_a_failed_run_of_a_sweep_is_reported_and_the_others_finish(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)  # Ray's workers import faulty_envs from here
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = cli.main(["finetune", "--from-scratch", "--preset", "tiny", "--logdir", str(tmp_path),
                     "--tasks", "walker_run,gym:faulty_envs:CrashAlways-v0", "--parallel", "2", "run_name=mixed",
                     "learner.total_frames=300", "eval.every_frames=300", "eval.episodes=2"])
    assert code == 1
    err = capsys.readouterr().err
    crashed = tmp_path / "mixed" / "gym_faulty_envs_CrashAlways-v0-seed0"
    assert f"failed: {crashed}" in err and "driver.log" in err
    assert "simulated environment failure" in (crashed / "driver.log").read_text()
    assert len(evaluations(tmp_path / "mixed" / "walker_run-seed0")) == 2  # the other run finished


def test_a_finetuning_resumes_with_its_evaluation_schedule(tmp_path, snapshot, capsys):
    code, run_dir = finetune(tmp_path, snapshot, "learner.total_frames=200", "--local", name="resume")
    assert code == 0 and [e["frame"] for e in evaluations(run_dir)] == [0, 200]
    assert cli.main(["pretrain", "--resume", str(run_dir)]) == 2
    assert f"continue it with choreo finetune --resume {run_dir}" in capsys.readouterr().err
    assert cli.main(["finetune", "--local", "--resume", str(run_dir), "learner.total_frames=400"]) == 0
    assert [e["frame"] for e in evaluations(run_dir)] == [0, 200, 400]  # not frame 0 again
