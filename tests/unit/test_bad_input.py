"""Bad input gets an error that names the file or key, fails before anything starts, and never
changes what is already on disk: run names, run directories, environment ids, --resume, snapshots."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from choreo.launch import cli
from choreo.agents import registry
from choreo.agents.config import AgentConfig
from choreo.launch.runtime.config import ConfigError, from_yaml_file, load_config, snapshot_shape_keys
from choreo.launch.runtime.rundir import RunDir, default_run_name
from choreo.launch.runtime.run import pretrain
from choreo.learner.learner import CHECKPOINT
from choreo.learner.snapshot import SnapshotError, check_compatible, load_snapshot, save_snapshot
from test_choreographer_agent import batch, make, tiny  # tests/unit is on sys.path (rootdir-relative imports)


# ----------------------------------------------------------------------------- helpers


def tree(root: Path) -> dict[str, object]:
    """Every entry under root (links not followed): relative path -> bytes, '<dir>' or '<link ...>'."""
    out: dict[str, object] = {}
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"<link {os.readlink(path)}>"
            elif path.is_dir():
                out[rel] = "<dir>"
            else:
                out[rel] = path.read_bytes()
    return out


def args(*overrides: str, logdir: Path | None = None, resume: Path | str | None = None,
         preset: tuple[str, ...] = ("tiny",)) -> argparse.Namespace:
    return argparse.Namespace(preset=list(preset) if resume is None else [], overrides=list(overrides),
                              logdir=str(logdir) if logdir else None, address=None, local=True,
                              resume=str(resume) if resume is not None else None)


@pytest.fixture(autouse=True)
def no_run(monkeypatch):
    """Stand-ins for the run loops: a refused run must never reach them (no Ray, no environments);
    an accepted one records its run directory instead of running."""
    started: list[Path] = []

    def run_local(config, run_dir, resume=False):
        started.append(Path(run_dir))
        return 0

    def run_distributed(config, run_dir, address=None, resume=False):
        raise AssertionError("the Ray runtime must not start in these tests")

    monkeypatch.setitem(sys.modules, "choreo.launch.runtime.local", types.SimpleNamespace(run_local=run_local))
    monkeypatch.setitem(sys.modules, "choreo.launch.runtime.distributed", types.SimpleNamespace(run_distributed=run_distributed))
    monkeypatch.setattr("choreo.launch.runtime.run.interrupt_on_sigterm", lambda: None)
    return started


def refused(a: argparse.Namespace, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        pretrain(a)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def make_run(run_dir: Path, checkpoint: bool = True) -> None:
    """A run directory as a run leaves it (config.yaml, replay, events, maybe a checkpoint)."""
    config = load_config(["tiny"], [f"logdir={run_dir.parent}", f"run_name={run_dir.name}"])
    RunDir(run_dir).write_config(config)
    (run_dir / "replay").mkdir()
    (run_dir / "replay" / "shard_0.msgpack").write_bytes(b"\x93replay-bytes")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.1").write_bytes(b"events")
    if checkpoint:
        torch.save({"agent": {"w": torch.ones(3)}, "updates": 7, "snapshots_written": [], "counters": {}},
                   run_dir / CHECKPOINT)


# ----------------------------------------------------------------------------- run names


BAD_NAMES = ["../escape", "a/b", "/abs", "..", ".", ".hidden", "a\\b", "   ", " padded", "tab\tin", "x" * 300]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_name_that_is_not_one_plain_name_is_refused_before_anything_is_created(tmp_path, name, no_run):
    logdir = tmp_path / "runs"
    message = refused(args(f"run_name={name}", logdir=logdir), "config key 'run_name'", repr(name))
    assert "plain directory name" in message
    assert tree(tmp_path) == {}, "nothing may be created, inside or outside logdir"
    assert no_run == []


def test_bad_run_name_through_the_command_line_exits_2_naming_the_key(tmp_path, capsys):
    assert cli.main(["pretrain", "--local", "--preset", "tiny", "--logdir", str(tmp_path / "runs"),
                     "run_name=../../etc"]) == 2
    err = capsys.readouterr().err
    assert "choreo: error: config key 'run_name': '../../etc'" in err
    assert tree(tmp_path) == {}


def test_plain_run_names_are_accepted(tmp_path, no_run):
    for name in ("walker-seed3", "run_1.b", "día"):
        assert pretrain(args(f"run_name={name}", logdir=tmp_path)) == 0
        assert no_run[-1] == (tmp_path / name).resolve()
        assert (tmp_path / name / "config.yaml").is_file()


def test_generated_run_name_is_one_component_even_for_gym_ids_with_slashes():
    config = load_config(["tiny"])
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, task="gym:ale_py:ALE/Pong-v5"))
    name = default_run_name(config)
    assert "/" not in name and ":" not in name and name.startswith("gym_ale_py_ALE_Pong-v5-choreographer-")


def test_generated_run_names_never_reuse_a_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("choreo.launch.runtime.run.time.strftime", lambda fmt: "20250101-000000")  # one second
    config = load_config(["tiny"])
    first = RunDir.create(config, tmp_path).path
    second = RunDir.create(config, tmp_path, write_config=False).path
    assert first.name == "walker_stand-choreographer-20250101-000000"
    assert second.name == first.name + "-2"
    assert sorted(p.name for p in first.iterdir()) == ["config.yaml"]


# ----------------------------------------------------------------------------- run directories


def test_symlinked_run_directory_outside_logdir_is_refused(tmp_path, no_run):
    logdir, outside = tmp_path / "runs", tmp_path / "elsewhere"
    logdir.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (logdir / "linked").symlink_to(outside)
    before = tree(tmp_path)
    refused(args("run_name=linked", logdir=logdir), str(logdir / "linked"), "outside logdir", str(outside))
    assert tree(tmp_path) == before
    assert no_run == []


def test_dangling_symlink_to_outside_logdir_is_refused_and_not_created(tmp_path):
    logdir, target = tmp_path / "runs", tmp_path / "not-yet"
    logdir.mkdir()
    (logdir / "dangling").symlink_to(target)
    refused(args("run_name=dangling", logdir=logdir), "outside logdir")
    assert not target.exists()


def test_run_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_bytes(b"not a directory")
    before = tree(tmp_path)
    refused(args("run_name=taken", logdir=tmp_path), str(tmp_path / "taken"), "is not a directory")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("checkpoint", [True, False], ids=["with-checkpoint", "crashed-before-checkpoint"])
def test_existing_run_is_refused_and_left_byte_identical(tmp_path, checkpoint, no_run):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    make_run(run_dir, checkpoint=checkpoint)
    before = tree(tmp_path)
    # Different settings, as a new run would have: nothing of them may reach the old directory.
    message = refused(args("run_name=old", "seed=5", "env.task=walker_walk", logdir=tmp_path), str(run_dir))
    if checkpoint:
        assert f"--resume {run_dir}" in message
    else:
        assert f"no {CHECKPOINT}" in message and "another run_name" in message and "config.yaml" in message
        assert "--resume needs" in message  # says why --resume is not the way out
    assert tree(tmp_path) == before
    assert no_run == []


def test_non_empty_directory_is_refused_and_empty_one_is_used(tmp_path, no_run):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = tree(tmp_path)
    refused(args("run_name=notes", logdir=tmp_path), "is not empty", "todo.txt")
    assert tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    assert pretrain(args("run_name=empty", logdir=tmp_path)) == 0
    assert no_run == [(tmp_path / "empty").resolve()]
    assert (tmp_path / "empty" / "config.yaml").is_file()


def test_config_written_for_a_new_run_never_replaces_an_existing_one(tmp_path):
    config = load_config(["tiny"])
    (tmp_path / "config.yaml").write_text("mine: 1\n")
    with pytest.raises(ConfigError, match="config.yaml already exists"):
        RunDir(tmp_path).write_config(config, exclusive=True)
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_run_directory_refuses_a_run_name_that_escapes_even_when_validation_was_skipped(tmp_path):
    config = dataclasses.replace(load_config(["tiny"]), run_name="../out")  # replace() skips validate()
    with pytest.raises(ConfigError, match="run_name"):
        RunDir.create(config, tmp_path / "runs")
    assert tree(tmp_path) == {}


# ----------------------------------------------------------------------------- environment ids


@pytest.mark.parametrize(
    "overrides, bad, names",
    [
        (["env.task=walker_bogus"], "walker_bogus", ["walker_stand", "choreo envs"]),
        (["env.task=walker_stnd"], "walker_stnd", ["did you mean 'walker_stand'"]),
        (["env.task=gym:NoSuchEnv-v0"], "gym:NoSuchEnv-v0", ["registered gymnasium environment", "gym:<module>:<id>"]),
        (["env.task=gym:Pendulum-v9"], "gym:Pendulum-v9", ["did you mean 'gym:Pendulum-v1'"]),
        (["env.task=gym:no_such_module_xyz:Foo-v0"], "gym:no_such_module_xyz:Foo-v0", ["cannot be imported"]),
        (["suite=metaworld", "env.task=mw_push"], "mw_push", ["unknown Meta-World task", "mw_reach"]),
        (["env.task=mw_bogus"], "mw_bogus", ["mw_reach", "choreo envs"]),
    ],
)
def test_unknown_environment_fails_before_any_directory_is_created(tmp_path, overrides, bad, names, no_run):
    logdir = tmp_path / "runs"
    message = refused(args(*overrides, logdir=logdir), "config key 'env.task'", repr(bad), *names)
    assert tree(tmp_path) == {}, message
    assert no_run == []


def test_registered_gym_ids_pass_validation():
    assert load_config(["tiny"], ["env.task=gym:Pendulum-v1"]).env.task == "gym:Pendulum-v1"


# ----------------------------------------------------------------------------- --resume


def test_resume_errors_name_the_directory_and_what_is_missing(tmp_path, no_run):
    refused(args(resume=tmp_path / "nope"), f"cannot resume {tmp_path / 'nope'}: no such directory")

    (tmp_path / "file").write_text("x")
    refused(args(resume=tmp_path / "file"), str(tmp_path / "file"), "not a directory")

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(args(resume=empty), f"cannot resume {empty}", "no config.yaml")

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    make_run(crashed, checkpoint=False)
    refused(args(resume=crashed), f"cannot resume {crashed}", f"no {CHECKPOINT}", "another run_name")

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    make_run(damaged)
    data = (damaged / CHECKPOINT).read_bytes()
    (damaged / CHECKPOINT).write_bytes(data[: len(data) // 2])
    refused(args(resume=damaged), f"cannot resume {damaged}", f"{CHECKPOINT} is damaged")

    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    make_run(bad_config)
    text = (bad_config / "config.yaml").read_text().replace("task: walker_stand", "task: walker_bogus")
    (bad_config / "config.yaml").write_text(text)
    refused(args(resume=bad_config), str(bad_config / "config.yaml"), "env.task", "walker_bogus")

    (bad_config / "config.yaml").write_text("seed: [unclosed\n")
    refused(args(resume=bad_config), "malformed YAML", str(bad_config / "config.yaml"))


def test_failed_resume_changes_nothing(tmp_path):
    crashed, damaged = tmp_path / "crashed", tmp_path / "damaged"
    for d in (crashed, damaged):
        d.mkdir()
    make_run(crashed, checkpoint=False)
    make_run(damaged)
    (damaged / CHECKPOINT).write_bytes(os.urandom(256))
    before = tree(tmp_path)
    refused(args(resume=crashed), "no checkpoint.pt")
    refused(args(resume=damaged), "damaged")
    assert tree(tmp_path) == before


def test_resume_refuses_overrides(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    make_run(run_dir)
    before = tree(tmp_path)
    refused(args("seed=3", resume=run_dir), "--resume continues a run with its saved config")
    assert tree(tmp_path) == before


def test_valid_resume_reaches_the_loop(tmp_path, no_run):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    make_run(run_dir)
    assert pretrain(args(resume=run_dir)) == 0
    assert no_run == [run_dir.resolve()]


def test_resume_may_extend_the_run_and_nothing_else(tmp_path, no_run):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    make_run(run_dir)
    before = tree(tmp_path)
    refused(args("seed=3", resume=run_dir), "--resume continues a run with its saved config",
            "config key 'seed' cannot change here", "learner.total_frames")
    refused(args("learner.total_frames=-5", resume=run_dir), "learner.total_frames")
    assert tree(tmp_path) == before
    assert pretrain(args("learner.total_frames=123456", resume=run_dir)) == 0
    assert from_yaml_file(run_dir / "config.yaml").learner.total_frames == 123456


# ----------------------------------------------------------------------------- snapshots


@pytest.fixture(scope="module")
def trained():
    """A tiny agent after one update (its optimizers hold moments) and its config."""
    agent = make()
    agent.update(batch())
    return agent, load_config(["tiny"])


@pytest.fixture
def snapshot(tmp_path, trained):
    agent, config = trained
    return save_snapshot(tmp_path / "snapshots" / "snapshot_1000.pt", agent.state_dict(), config, 1000, 1)


def test_snapshot_round_trip_fits_a_fresh_agent(snapshot, trained):
    agent, config = trained
    assert not snapshot.with_name(snapshot.name + ".tmp").exists()
    fresh = make(seed=5)
    data = load_snapshot(snapshot, expected=fresh.state_dict(), config=config)
    assert (data["frames"], data["updates"], data["version"]) == (1000, 1, 1)
    assert data["config"]["learner"]["snapshot_frames"] == [1000, 2000]  # tuples stored as lists
    assert data["config"]["agent"]["world_model"]["deter"] == config.agent.world_model.deter
    fresh.load_state_dict(data["agent"])
    for k, v in agent.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fresh.state_dict()[k]), k


def test_snapshot_is_replaced_atomically(tmp_path, trained):
    agent, config = trained
    path = save_snapshot(tmp_path / "s.pt", agent.state_dict(), config, 1, 1)
    save_snapshot(path, agent.state_dict(), config, 2, 2)
    assert load_snapshot(path)["frames"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def _load_fails(path: Path, *fragments: str, expected=None, config=None) -> str:
    """Load as fine-tuning does: with the config, the agent's shape keys come from its algorithm."""
    before = path.read_bytes() if path.exists() else None
    shape_keys = snapshot_shape_keys(config) if config is not None else ()
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path, expected=expected, config=config, shape_keys=shape_keys)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if before is not None:
        assert path.read_bytes() == before, "a failed load must not change the file"
    return message


def test_missing_snapshot_names_the_file(tmp_path):
    _load_fails(tmp_path / "snapshot_5.pt", "no such file")


def test_truncated_snapshot_names_the_file(snapshot):
    data = snapshot.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        snapshot.write_bytes(data[:cut])
        _load_fails(snapshot, "truncated, corrupted or not a torch file")


def test_random_bytes_are_not_a_snapshot(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _load_fails(path, "cannot be read")


def test_torch_file_that_is_not_a_choreo_snapshot(tmp_path, trained):
    agent, config = trained
    path = tmp_path / "old_format.pt"
    torch.save({"agent": agent.state_dict(), "frames": 1000, "updates": 1}, path)  # the learner's older layout
    _load_fails(path, "not a choreo snapshot", "frames")
    torch.save(torch.ones(3), path)
    _load_fails(path, "not a choreo snapshot", "Tensor")
    torch.save({"agent": argparse.Namespace(x=1)}, path)  # a pickled object: refused, never run
    _load_fails(path, "objects other than tensors")


def test_snapshot_with_missing_keys_or_another_version(tmp_path, trained):
    agent, config = trained
    path = save_snapshot(tmp_path / "s.pt", agent.state_dict(), config, 1, 1)
    data = torch.load(path, weights_only=True)
    incomplete = {k: v for k, v in data.items() if k != "agent"}
    torch.save(incomplete, path)
    _load_fails(path, "missing agent")
    torch.save({**data, "version": 99}, path)
    _load_fails(path, "format version 99")
    torch.save({**data, "frames": "many"}, path)
    _load_fails(path, "'frames' is a str")


def test_snapshot_from_other_sizes_names_key_shapes_and_config_keys(snapshot, trained):
    other_cfg = load_config(["tiny"], ["agent.world_model.deter=16"])
    other = make(cfg=tiny("agent.world_model.deter=16"))
    message = _load_fails(snapshot, "does not fit this agent", "in the snapshot", "in this agent",
                          "agent.world_model.deter: 32 -> 16", expected=other.state_dict(), config=other_cfg)
    saved = torch.load(snapshot, weights_only=True)["agent"]
    fresh = other.state_dict()
    key = next(k for k in fresh if isinstance(fresh[k], torch.Tensor) and saved[k].shape != fresh[k].shape)
    assert f"'{key}' has shape {tuple(saved[key].shape)} in the snapshot and {tuple(fresh[key].shape)}" in message


def test_shape_keys_come_from_the_algorithm(snapshot, trained):
    """The learner names no algorithm's keys: the agent declares them (relative to its config),
    the run config's section is added by launch, and each names an existing integer field."""
    keys = registry.shape_keys("choreographer")
    assert "world_model.deter" in keys and "choreographer.num_codes" in keys
    assert snapshot_shape_keys(load_config(["tiny"])) == tuple("agent." + k for k in keys)
    for key in keys:
        node = AgentConfig()
        for part in key.split("."):
            assert hasattr(node, part), f"shape key {key!r} is not a field of AgentConfig"
            node = getattr(node, part)
        assert isinstance(node, int), key
    # Without the agent's keys only the tensors and the run-level keys are named.
    other_cfg = load_config(["tiny"], ["agent.world_model.deter=16"])
    with pytest.raises(SnapshotError) as info:
        load_snapshot(snapshot, expected=make(cfg=other_cfg.agent).state_dict(), config=other_cfg)
    assert "does not fit this agent" in str(info.value) and "agent.world_model.deter" not in str(info.value)


def test_snapshot_with_missing_or_unexpected_tensors(snapshot, trained):
    deeper_cfg = load_config(["tiny"], ["agent.world_model.mlp_layers=3"])
    deeper = make(cfg=tiny("agent.world_model.mlp_layers=3"))
    _load_fails(snapshot, "is missing from the snapshot", "agent.world_model.mlp_layers: 2 -> 3",
                expected=deeper.state_dict(), config=deeper_cfg)
    shallow_cfg = load_config(["tiny"], ["agent.actor_critic.layers=1"])
    shallow = make(cfg=tiny("agent.actor_critic.layers=1"))
    _load_fails(snapshot, "unexpected", "agent.actor_critic.layers: 2 -> 1",
                expected=shallow.state_dict(), config=shallow_cfg)


def test_snapshot_from_pixels_does_not_fit_a_states_agent(tmp_path):
    pixels_cfg = load_config(["tiny", "pixels"])
    pixels = make((3, 64, 64), cfg=pixels_cfg.agent)
    path = save_snapshot(tmp_path / "p.pt", pixels.state_dict(), pixels_cfg, 1, 0)
    _load_fails(path, "does not fit", "env.obs: 'pixels' -> 'states'", expected=make().state_dict(),
                config=load_config(["tiny"]))


def test_nested_optimizer_state_is_compared(snapshot, trained):
    """A mismatch deep inside the agent's nested state (an optimizer's parameter groups) is found."""
    data = torch.load(snapshot, weights_only=True)
    fresh = make().state_dict()
    extra = data["agent"]["_extra_state"]
    extra["world_model_opt"]["param_groups"][0]["params"] = extra["world_model_opt"]["param_groups"][0]["params"][:-1]
    with pytest.raises(SnapshotError, match=r"_extra_state/world_model_opt/param_groups/0/params' has \d+ entries"):
        check_compatible(data, fresh, snapshot)
