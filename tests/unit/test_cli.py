"""One command line for every command: `task=` short for `env.task=`, `--config FILE` composed in
the documented order, `--version`, help for a bare `choreo`, a closed pipe, and clear refusals
(an export into a non-empty folder, a misspelt preset, a directory where a file is wanted)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import choreo
from choreo.launch import cli
from choreo.launch.runtime.config import Config, ConfigError, load_config, read_config_file, to_yaml
from choreo.launch.runtime.rundir import RunDir

CHOREO = Path(sys.executable).with_name("choreo")


def config_out(capsys, *argv: str) -> dict:
    assert cli.main(["config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A tiny walker_stand snapshot (random weights)."""
    from choreo.launch.runtime.build import env_shapes, make_agent
    from choreo.learner.snapshot import save_snapshot

    config = load_config(["tiny"], ["env.task=walker_stand", "learner.device=cpu"])
    agent = make_agent(config, *env_shapes(config))
    return save_snapshot(tmp_path_factory.mktemp("run") / "snapshot_1000.pt", agent.state_dict(), config, 1000, 10)


def dotted(config: Config, key: str) -> object:
    for part in key.split("."):
        config = getattr(config, part)
    return config


class Stop(Exception):
    """Raised where a test has seen what it needed, before the work starts."""


def visualize_header(monkeypatch, capsys, *argv: str) -> str:
    """The first line `choreo visualize` prints (it names the task), without playing any skill."""
    from choreo.launch.commands import visualize

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop

    monkeypatch.setattr(visualize, "run_jobs", stop)
    with pytest.raises(Stop):
        cli.main(["visualize", *argv])
    return capsys.readouterr().out.splitlines()[0]


# ----------------------------------------------------------------------------- task=


def test_task_is_short_for_env_task_in_config(capsys):
    assert config_out(capsys, "--preset", "tiny", "task=walker_run")["env"]["task"] == "walker_run"
    assert load_config(["tiny"], ["task=walker_run"]) == load_config(["tiny"], ["env.task=walker_run"])


def test_task_is_short_for_env_task_in_visualize(snapshot, monkeypatch, capsys):
    header = visualize_header(monkeypatch, capsys, "--snapshot", str(snapshot), "task=walker_run")
    assert header.startswith(f"{snapshot} (1,000 frames): 8 skills on walker_run from states")


def test_task_is_expanded_once_in_config_py():
    roots = [Path(cli.__file__).parent]
    copies = [f"{p}:{n}" for root in roots for p in root.rglob("*.py")
              for n, line in enumerate(p.read_text().splitlines(), 1) if '"env." + o' in line]
    assert copies == []


def test_a_resumed_run_may_not_change_its_task(tmp_path):
    from choreo.launch.runtime.config import RESUME_OVERRIDES, with_overrides

    with pytest.raises(ConfigError, match="config key 'env.task' cannot change here"):
        with_overrides(load_config(["tiny"]), ["task=walker_run"], RESUME_OVERRIDES)


# ----------------------------------------------------------------------------- --config FILE


@pytest.fixture()
def expected() -> Config:
    return load_config(["tiny"], ["seed=3", "env.task=walker_run", "learner.total_frames=3000", "num_actors=1"])


def overrides_file(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text("size: tiny\nseed: 3\ntask: walker_run\nnum_actors: 1\nlearner:\n  total_frames: 3e3\n")
    return path


def saved_config(tmp_path: Path, config: Config) -> Path:
    run = RunDir(tmp_path / "run")
    run.write_config(config)
    return run.config_file


def test_config_file_of_overrides_and_saved_config_give_the_runs_config(tmp_path, expected, capsys):
    for path in (overrides_file(tmp_path), saved_config(tmp_path, expected)):
        assert load_config([], [], path) == expected, path
        assert cli.main(["config", "--config", str(path)]) == 0
        assert capsys.readouterr().out == to_yaml(expected)


def test_pretrain_runs_the_config_of_a_saved_config(tmp_path, expected, monkeypatch):
    from choreo.launch.runtime import local
    from choreo.launch.runtime.config import from_yaml_file
    from choreo.launch.runtime.signals import signals_stop_the_run

    seen = []
    monkeypatch.setattr(local, "run_local", lambda config, run_dir, resume=False: seen.append((config, run_dir)) or 0)
    logdir = tmp_path / "runs"
    with signals_stop_the_run():
        assert cli.main(["pretrain", "--local", "--config", str(saved_config(tmp_path, expected)),
                         "--logdir", str(logdir), "run_name=again"]) == 0
    config, run_dir = seen[0]
    assert config == dataclasses.replace(expected, logdir=str(logdir), run_name="again")
    assert from_yaml_file(Path(run_dir) / "config.yaml") == config


def test_order_key_value_beats_config_file_beats_presets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: tiny\nseed: 5\nlearner: {total_frames: 111}\n")
    config = load_config(["paper"], [], path)
    assert (config.size, config.seed, config.learner.total_frames) == ("tiny", 5, 111)  # beats --preset paper
    assert config.agent == load_config(["tiny"]).agent  # the tiny preset is the one composed
    config = load_config(["paper"], ["learner.total_frames=222", "seed=6", "size=small"], path)
    assert (config.size, config.seed, config.learner.total_frames) == ("small", 6, 222)
    assert config.agent == load_config(["small"]).agent
    # The file comes after the presets' `when` rules too (tiny's: fine-tuning 2000 frames).
    tuned = load_config([], ["mode=finetune", "from_scratch=true"], path)
    assert tuned.learner.total_frames == 111 and tuned.eval.every_frames == 1000


def test_a_saved_config_of_another_mode_is_put_into_the_commands(tmp_path, expected):
    path = saved_config(tmp_path, expected)  # a pretraining run's (mode pretrain, 3000 frames)
    tuned = load_config([], ["mode=finetune", "from_scratch=true"], path)
    fresh = load_config(["tiny"], ["mode=finetune", "from_scratch=true", "seed=3", "env.task=walker_run"])
    assert tuned.learner.total_frames == 2000  # tiny's fine-tuning, not the pretraining run's 3000
    for key in ("learner.total_frames", "learner.seed_frames", "learner.snapshot_frames", "eval.every_frames",
                "eval.episodes", "seed", "env.task", "agent"):
        assert dotted(tuned, key) == dotted(fresh, key), key
    assert (tuned.mode, tuned.num_actors) == ("finetune", 1)  # the file's own keys stay
    assert load_config([], ["mode=finetune", "from_scratch=true", "learner.total_frames=9"], path).learner.total_frames == 9


def test_config_file_in_commands_that_start_from_a_snapshot(snapshot, tmp_path, monkeypatch, capsys):
    from choreo.launch.runtime.snapshot import Snapshot

    path = tmp_path / "v.yaml"
    path.write_text("env: {task: walker_run}\nseed: 4\n")
    header = visualize_header(monkeypatch, capsys, "--snapshot", str(snapshot), "--config", str(path))
    assert "skills on walker_run" in header
    opened = Snapshot.open(snapshot, ["seed=9"], config_file=path)
    assert (opened.config.env.task, opened.config.seed) == ("walker_run", 9)  # key=value beats the file
    assert Snapshot.open(snapshot, mode="plan", config_file=path).config.mode == "plan"


@pytest.mark.parametrize("text, message", [
    ("learner: {total_frame: 5}\n", r"unknown config key 'learner.total_frame' \(did you mean 'learner.total_frames'\?\)"),
    ("seed: many\n", r"config key 'seed': 'many' is not an integer"),
    ("size: huge\n", r"config key 'size': 'huge' is not one of"),
    ("learner: 5\n", r"config key 'learner' is a section"),
    ("task: walker_run\nenv: {task: walker_walk}\n", r"sets both 'task' and 'env.task'"),
    ("- seed\n", r"must hold a mapping of keys"),
    ("seed: [unclosed\n", r"malformed YAML"),
    ("when: [{mode: pretrain, set: {seed: 1}}]\n", r"'when' rules belong in presets"),
])
def test_config_file_errors_name_the_file_and_key(tmp_path, text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        read_config_file(path)
    assert str(path) in str(e.value)
    assert cli.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_config_file_that_is_a_directory_or_missing(tmp_path, expected):
    saved_config(tmp_path, expected)
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'run'}: is a directory, not a YAML file; "
                                          f"its saved config is {tmp_path / 'run' / 'config.yaml'}"):
        load_config([], [], tmp_path / "run")
    with pytest.raises(ConfigError, match=f"config file {tmp_path}: is a directory, not a YAML file$"):
        load_config([], [], tmp_path)
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'none.yaml'} does not exist"):
        load_config([], [], tmp_path / "none.yaml")


def test_resume_refuses_a_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    assert cli.main(["pretrain", "--local", "--resume", str(tmp_path), "--config", str(path)]) == 2
    assert "--resume continues a run with the config saved in its run directory; drop --config" in \
        capsys.readouterr().err


def test_every_command_with_overrides_takes_config():
    parser = cli.build_parser()
    for argv in (["config"], ["pretrain"], ["finetune"], ["evaluate"], ["plan", "--snapshot", "s"],
                 ["visualize", "--snapshot", "s"]):
        assert parser.parse_args([*argv, "--config", "c.yaml"]).config == "c.yaml", argv


# ----------------------------------------------------------------------------- the command line itself


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"choreo {choreo.__version__}\n"


def test_bare_choreo_prints_its_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: choreo") and "pretrain" in out and "visualize" in out


def test_a_closed_pipe_leaves_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # The shell pipeline users type; `head` may exit before or after choreo has written everything.
    done = subprocess.run(f"'{CHOREO}' config --explain 2>'{tmp_path / 'err'}' | head -1", shell=True,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.startswith("algo = ")
    assert (tmp_path / "err").read_text() == ""
    # The reader gone before the first write: every write fails.
    proc = subprocess.Popen([str(CHOREO), "config", "--explain"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert err == b"" and proc.returncode == 1


def test_export_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.write_config(load_config(["tiny"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert cli.main(["export", str(run.path), "--out", str(out)]) == 2
    assert f"--out {out}: the folder is not empty (it holds notes.txt); export into a new or empty folder" in \
        capsys.readouterr().err
    assert cli.main(["export", str(run.path), "--out", str(out / "notes.txt")]) == 2
    assert f"--out {out / 'notes.txt'}: is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_misspelt_preset_gets_a_suggestion(capsys):
    with pytest.raises(ConfigError, match=r"unknown preset 'tinny' \(did you mean 'tiny'\?\); valid presets: "):
        load_config(["tinny"])
    assert cli.main(["config", "--preset", "tinny"]) == 2
    assert "did you mean 'tiny'?" in capsys.readouterr().err


def test_a_file_where_a_folder_is_wanted_and_the_reverse(snapshot, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    assert cli.main(["visualize", "--snapshot", str(snapshot), "--out", str(afile)]) == 2
    assert f"--out {afile}: is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["config", "--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path}: is a directory, not a YAML file" in capsys.readouterr().err
    assert cli.main(["export", str(afile), "--out", str(tmp_path / "o")]) == 2
    assert f"{afile} is a file, not a run directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path), "--markdown", str(tmp_path)]) == 2
    assert f"--markdown {tmp_path}: is a directory, not a file" in capsys.readouterr().err
