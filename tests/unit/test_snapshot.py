"""The one snapshot opener (`Snapshot` in launch/runtime/snapshot.py): overrides of the saved config,
a directory given where a file is wanted, a snapshot of another shape refused naming the keys that
differ, and the same opener behind fine-tuning's start and the commands. Tiny networks."""

from __future__ import annotations

import pytest
import torch

from choreo.launch import cli
from choreo.launch.runtime.build import env_shapes, make_agent
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.runtime.rundir import RunDir
from choreo.launch.runtime.snapshot import Snapshot
from choreo.learner.snapshot import SnapshotError, save_snapshot


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    """A run directory holding two snapshots of a tiny walker agent; returns (run, config, agent)."""
    config = load_config(["tiny"], ["seed=7", "learner.device=cpu"])
    agent = make_agent(config, *env_shapes(config))
    run = RunDir(tmp_path_factory.mktemp("walker") / "run")
    save_snapshot(run.snapshot(1000), agent.state_dict(), config, frames=1000, updates=10)
    save_snapshot(run.snapshot(2000), agent.state_dict(), config, frames=2000, updates=25)
    return run, config, agent


def test_overrides_apply_to_the_saved_config(walker):
    run, config, _ = walker
    opened = Snapshot.open(run.snapshot(2000), ["seed=3", "task=walker_run"])
    assert opened.config.seed == 3 and opened.config.env.task == "walker_run"  # `task=` short for env.task
    assert opened.config.agent == config.agent  # the rest is the run's own
    assert (opened.frames, opened.updates) == (2000, 25)
    with pytest.raises(ConfigError, match=f"{run.snapshot(2000)}: unknown config key 'agent.nonsense'"):
        Snapshot.open(run.snapshot(2000), ["agent.nonsense=1"])
    with pytest.raises(ValueError, match="give neither"):
        Snapshot.open(run.snapshot(2000), ["seed=3"], config=config)


def test_the_agent_carries_the_snapshot_weights(walker):
    run, _, saved = walker
    opened = Snapshot.open(run.snapshot(1000))
    agent = opened.make_agent()
    for name, value in saved.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(agent.state_dict()[name], value), name
    weights = opened.policy_weights()
    assert opened.policy_weights() is weights  # built once
    for name, value in saved.policy_weights().items():
        assert (weights[name] == value).all(), name


def test_a_directory_is_named_as_one_with_the_snapshot_to_give(walker, tmp_path):
    run, _, _ = walker
    for given in (run.path, run.snapshots):  # the run directory, or its snapshots folder
        with pytest.raises(SnapshotError, match="is a directory, not a snapshot file") as e:
            Snapshot.open(given)
        assert str(run.snapshot(2000)) in str(e.value) and "no such file" not in str(e.value)
    with pytest.raises(SnapshotError, match="is a directory, not a snapshot file, and holds no snapshots"):
        Snapshot.open(tmp_path)
    with pytest.raises(SnapshotError, match=f"{tmp_path / 'none.pt'}: no such file"):
        Snapshot.open(tmp_path / "none.pt")


@pytest.mark.parametrize("command", [["finetune", "--preset", "tiny"], ["evaluate", "--preset", "tiny"], ["plan"],
                                     ["visualize"]])
def test_every_command_says_a_directory_is_one(walker, tmp_path, capsys, command):
    run, _, _ = walker
    logdir = ["--logdir", str(tmp_path / "runs")] if command[0] != "visualize" else []
    assert cli.main([*command, "--snapshot", str(run.path), *logdir]) == 2
    err = capsys.readouterr().err
    assert f"snapshot {run.path}: is a directory" in err and str(run.snapshot(2000)) in err
    assert not (tmp_path / "runs").exists()  # refused before anything was created


def test_another_shape_is_refused_naming_the_key(walker):
    run, config, _ = walker
    with pytest.raises(SnapshotError, match=r"does not fit.*agent\.world_model\.deter: 32 -> 16"):
        Snapshot.open(run.snapshot(1000), ["agent.world_model.deter=16"]).make_agent()
    with pytest.raises(SnapshotError, match=r"does not fit.*env\.task: 'walker_stand' -> 'quadruped_walk'"):
        Snapshot.open(run.snapshot(1000), ["task=quadruped_walk"]).make_agent()


def test_fine_tuning_starts_from_the_snapshot_through_the_same_opener(walker):
    run, _, saved = walker
    tune = load_config(["tiny"], ["mode=finetune", f"snapshot={run.snapshot(1000)}", "learner.device=cpu"])
    scratch = load_config(["tiny"], ["mode=finetune", "from_scratch=true", "learner.device=cpu"])
    tuned, fresh = make_agent(tune, *env_shapes(tune)), make_agent(scratch, *env_shapes(scratch))
    pretrained = {k: v for k, v in saved.wm.state_dict().items() if not k.startswith("reward.")}  # reset for the task
    assert all(torch.equal(tuned.wm.state_dict()[k], v) for k, v in pretrained.items())
    assert not all(torch.equal(fresh.wm.state_dict()[k], v) for k, v in pretrained.items())  # seeds differ
    bigger = load_config(["tiny"], ["mode=finetune", f"snapshot={run.snapshot(1000)}", "learner.device=cpu",
                                    "agent.world_model.deter=16"])
    with pytest.raises(SnapshotError, match=r"agent\.world_model\.deter: 32 -> 16"):
        make_agent(bigger, *env_shapes(bigger))
