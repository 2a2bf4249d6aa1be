"""The run directory type (launch/runtime/rundir.py): the names of a run's files, creation and
resume checks, evaluation records in one format that `choreo report` reads whichever command wrote
them, and atomic writes of summaries. No Ray, no environment stepping."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from choreo.launch.commands import report as rep
from choreo.launch.runtime import rundir as rd
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.runtime.core import RunCore
from choreo.launch.runtime.monitor import Monitor
from choreo.launch.runtime.rundir import EvalRecord, EvalRecordError, RunDir, read_eval_records
from choreo.learner.learner import CHECKPOINT


def test_layout_names_the_files_users_and_the_learner_know(tmp_path):
    run = RunDir(tmp_path)
    # The names are a contract with users (README, scripts) and with the learner, which writes its own files.
    assert run.config_file == tmp_path / "config.yaml"
    assert run.checkpoint == tmp_path / CHECKPOINT == tmp_path / "checkpoint.pt"
    assert run.snapshot(2000) == tmp_path / "snapshots" / "snapshot_2000.pt"
    assert run.snapshot(12, "updates") == tmp_path / "snapshots" / "snapshot_12updates.pt"
    assert run.replay == tmp_path / "replay" and run.tensorboard == tmp_path / "tensorboard"
    assert run.placement == tmp_path / "placement.json" and run.driver_log == tmp_path / "driver.log"
    assert run.eval_file == tmp_path / "eval.jsonl"
    assert run.results_file("zero_shot") == tmp_path / "zero_shot.jsonl"
    assert run.summary_file("plan") == tmp_path / "plan.json"
    with pytest.raises(ValueError, match="unknown kind of results 'bogus'"):
        run.results_file("bogus")
    assert os.fspath(run) == str(tmp_path) and Path(run) == tmp_path


def test_the_learner_writes_its_snapshots_where_the_run_directory_finds_them(tmp_path):
    from choreo.learner.config import LearnerConfig
    from choreo.learner.learner import Learner

    class Agent:
        def state_dict(self):
            return {"w": torch.ones(2)}

    learner = Learner(Agent(), lambda: None, lambda weights, version: None,
                      LearnerConfig(snapshot_frames=(100, 300)), tmp_path, prefetch=0)
    learner.updates = 0
    written = [learner.maybe_snapshot(150), learner.maybe_snapshot(400)]
    run = RunDir(tmp_path)
    assert written == [run.snapshot(100), run.snapshot(300)]
    assert run.snapshot_files() == written  # oldest first
    learner.close()


def test_create_writes_the_config_and_reads_it_back(tmp_path):
    config = load_config(["tiny"], ["seed=5", "run_name=first"])
    run = RunDir.create(config, tmp_path)
    assert run.path == (tmp_path / "first").resolve()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml"]  # no temporary file left
    assert run.read_config() == config
    parent = RunDir.create(load_config(["tiny"], ["run_name=sweep"]), tmp_path, write_config=False)
    assert list(parent.path.iterdir()) == []
    with pytest.raises(ConfigError, match="not empty"):  # a directory holding anything is never reused
        (parent.path / "notes.txt").write_text("mine")
        RunDir.create(load_config(["tiny"], ["run_name=sweep"]), tmp_path)


def test_resume_checks_name_the_directory_and_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        RunDir.resume(tmp_path / "nope")
    run = RunDir.create(load_config(["tiny"], ["run_name=r"]), tmp_path)
    with pytest.raises(ConfigError, match=f"cannot resume {run.path}: it holds no {CHECKPOINT}"):
        RunDir.resume(run.path)
    torch.save({"agent": {}}, run.checkpoint)
    assert RunDir.resume(tmp_path / "r") == run
    data = run.checkpoint.read_bytes()
    run.checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=f"{CHECKPOINT} is damaged"):
        RunDir.resume(run.path)
    run.config_file.unlink()
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        RunDir.resume(run.path)
    with pytest.raises(ConfigError, match="is not a run directory"):
        RunDir.open(run.path)


# ----------------------------------------------------------------------------- atomic writes


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.write_results("zero_shot", [{"job": 0}, {"job": 1}], {"episodes": 2})
    assert [json.loads(x) for x in run.results_file("zero_shot").read_text().splitlines()] == [{"job": 0}, {"job": 1}]
    assert json.loads(run.summary_file("zero_shot").read_text()) == {"episodes": 2}

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rd.os, "replace", crash)  # the process dies between writing and renaming
    with pytest.raises(OSError, match="disk full"):
        run.write_json(run.summary_file("zero_shot"), {"episodes": 99})
    assert json.loads(run.summary_file("zero_shot").read_text()) == {"episodes": 2}  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero_shot.json", "zero_shot.jsonl"]  # no temporary left


def test_config_of_a_run_is_replaced_atomically(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.write_config(load_config(["tiny"], ["seed=1"]))
    monkeypatch.setattr(rd.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        run.write_config(load_config(["tiny"], ["seed=2"]))
    assert run.read_config().seed == 1
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ----------------------------------------------------------------------------- evaluation records


def test_appended_evaluations_are_synced_and_read_back_by_report(tmp_path, monkeypatch):
    synced = []
    real_fsync = rd.os.fsync
    monkeypatch.setattr(rd.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    run = RunDir(tmp_path)
    run.append_eval(EvalRecord.of("walker_stand", 3, 0, 0, "finetune", [1.0, 3.0]))
    run.append_eval(EvalRecord.of("walker_stand", 3, 10000, 2500, "finetune", [10.0, 20.0, 30.0]))
    assert len(synced) == 2  # each line is on disk before the run goes on
    first = json.loads(run.eval_file.read_text().splitlines()[0])
    assert first == {"task": "walker_stand", "seed": 3, "frame": 0, "updates": 0, "mean_return": 2.0,
                     "returns": [1.0, 3.0], "mode": "finetune"}
    (only,) = rep.read_eval_file(run.eval_file)
    assert (only.task, only.seed, only.mode) == ("walker_stand", 3, "finetune")
    assert only.curve == {0: 2.0, 10000: 20.0}
    assert [r.updates for r in run.read_evals()] == [0, 2500]


def test_a_record_report_would_refuse_is_never_written(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(EvalRecordError, match="mode must be one of"):
        run.append_eval(EvalRecord.of("walker_stand", 0, 0, 0, "offline", [1.0]))
    assert not run.eval_file.exists()
    with pytest.raises(ValueError, match="may not be named mean_return"):  # the mean is the returns'
        EvalRecord.of("walker_stand", 0, 0, 0, "plan", [1.0], mean_return=5.0)
    with pytest.raises(ValueError, match="one return per episode"):
        EvalRecord.of("walker_stand", 0, 0, 0, "plan", [])


def test_lines_of_older_files_still_read(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"task": "walker_walk", "seed": 1, "frame": 5000.0, "mean_return": 7.5}\n\n'
                    '{"task": "walker_walk", "seed": 1, "frame": 0, "mean_return": 1, "returns": [1], '
                    '"mode": "plan", "normalised_distance": 0.4}\n')
    (n1, a), (n2, b) = read_eval_records(path)
    assert (n1, n2) == (1, 3)  # the blank line is counted
    assert a == EvalRecord("walker_walk", 1, 5000, 7.5)  # no updates, no returns, mode finetune
    assert b.mode == "plan" and b.extra == {"normalised_distance": 0.4} and b.updates is None
    path.write_text('{"task": "walker_walk", "seed": 1, "frame": 0, "mean_return": 1, "updates": -3}\n')
    with pytest.raises(EvalRecordError, match=f"{path}:1: updates must be a non-negative integer"):
        read_eval_records(path)


def test_the_run_core_writes_records_that_report_reads(tmp_path):
    config = load_config(["tiny"], ["mode=finetune", "from_scratch=true", "seed=4", "eval.every_frames=100"])
    core = RunCore(config, tmp_path, num_workers=1, action_repeat=1, counters=None, updates=0, local=True,
                   monitor=Monitor(tmp_path, 1000, stream=io.StringIO()))
    core.evaluated(0, [1.0, 2.0])
    core.updates = 40
    core.evaluated(100, [4.0], skill_counts=[{"3": 10}])
    core.monitor.close()
    (run,) = rep.read_eval_file(RunDir(tmp_path).eval_file)
    assert (run.task, run.seed, run.mode) == (config.env.task, 4, "scratch")
    assert run.curve == {0: 1.5, 100: 4.0}
    assert [r.updates for r in RunDir(tmp_path).read_evals()] == [0, 40]
    assert [r.extra for r in RunDir(tmp_path).read_evals()] == [{}, {"skill_counts": [{"3": 10}]}]


def test_plan_and_fine_tuning_records_report_side_by_side(tmp_path, monkeypatch):
    """`choreo plan` writes its eval.jsonl line in the same format as a fine-tuning run's."""
    from choreo.launch.commands import plan as plan_command

    config = load_config(["tiny"], ["algo=dads", "env.task=point_mass_nav", "seed=2"])
    jobs = [{"returns": [-10.0, -30.0], "xy": [[[0, 0], [1, 0]], [[0, 0], [0, 0]]], "goals": [[4, 0], [0, 2]]}]
    monkeypatch.setattr(plan_command, "run_jobs", lambda *args, **kwargs: jobs)
    planned = RunDir(tmp_path / "plan")
    planned.path.mkdir()
    summary = plan_command.plan(config, tmp_path / "s.pt", planned, 2, "plan", local=True)
    (record,) = planned.read_evals()
    assert (record.task, record.seed, record.frame, record.updates, record.mode) == ("point_mass_nav", 2, 0, 0, "plan")
    assert record.returns == (-10.0, -30.0) and record.mean_return == summary["mean_return"] == -20.0
    assert record.extra == {"normalised_distance": summary["normalised_distance"]}
    assert json.loads(planned.summary_file("plan").read_text())["episodes"] == 2
    assert len(planned.results_file("plan").read_text().splitlines()) == 2

    tuned = RunDir(tmp_path / "tuned")
    tuned.path.mkdir()
    tuned.append_eval(EvalRecord.of("point_mass_nav", 2, 1000, 50, "finetune", [-5.0]))
    files, _ = rep.find_eval_files([tmp_path])
    runs = {r.mode: r for r in rep.collect_runs(files)}
    assert set(runs) == {"plan", "finetune"}
    assert runs["plan"].final_return == -20.0 and runs["finetune"].final_return == -5.0
