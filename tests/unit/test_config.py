"""The typed config: composition order, overrides, and errors that name the key at fault."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from choreo.launch.runtime.config import (
    Config,
    ConfigError,
    from_yaml_file,
    iter_fields,
    load_config,
    to_yaml,
)
from choreo.launch.runtime.rundir import RunDir


def test_defaults_are_the_paper_sizes():
    config = load_config()
    wm = config.agent.world_model
    assert (wm.deter, wm.stoch, wm.classes, wm.mlp_units, wm.mlp_layers) == (200, 32, 32, 400, 4)
    assert (config.replay.batch_size, config.replay.batch_length) == (50, 50)
    assert config.agent.choreographer.num_codes == 64 and config.agent.choreographer.code_dim == 16
    assert config.env.obs == "states" and config.env.action_repeat == 1


def test_presets_compose_in_group_order_whatever_the_command_line_order():
    a = load_config(["pixels", "tiny"])
    b = load_config(["tiny", "pixels"])
    assert a == b
    assert a.env.obs == "pixels" and a.env.action_repeat == 2
    assert a.replay.samples_per_insert == 4.0  # size/tiny comes after suite/pixels
    assert load_config(["pixels"]).replay.samples_per_insert == 500.0
    assert a.agent.world_model.deter == 32  # from size/tiny
    assert (a.suite, a.size) == ("pixels", "tiny")


def test_overrides_win_over_presets_and_parse_types():
    config = load_config(["tiny"], ["agent.world_model.deter=64", "replay.capacity=2e6", "seed=7",
                                    "agent.choreographer.knn_bf16=true", "learner.snapshot_frames=[10, 20]"])
    assert config.agent.world_model.deter == 64
    assert config.replay.capacity == 2_000_000 and isinstance(config.replay.capacity, int)
    assert config.seed == 7
    assert config.agent.choreographer.knn_bf16 is True
    assert config.learner.snapshot_frames == (10, 20)


def test_group_can_be_chosen_by_override():
    config = load_config([], ["suite=metaworld"])
    assert config.env.task == "mw_reach" and config.env.obs == "pixels"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["agent.world_model.detr=3"], "'agent.world_model.detr' (did you mean 'agent.world_model.deter'?)"),
        (["nope=1"], "unknown config key 'nope'"),
        (["env.obs=pixel"], "'env.obs': 'pixel' is not one of 'states', 'pixels'"),
        (["seed=abc"], "'seed': 'abc' is not an integer"),
        (["seed=1.5"], "'seed': '1.5' is not an integer"),
        (["agent.world_model.lr=fast"], "'agent.world_model.lr': 'fast' is not a number"),
        (["agent.choreographer.knn_bf16=maybe"], "'agent.choreographer.knn_bf16': 'maybe' is not true or false"),
        (["env=3"], "'env' is a section"),
        (["env.task=walker_wlak"], "did you mean 'walker_walk'"),
        (["suite=metaworld", "env.task=walker_walk"], "suite 'metaworld' needs a Meta-World task"),
        (["algo=choreo"], "'algo': 'choreo' is not one of"),
        (["num_actors=0"], "'num_actors' must be at least 1"),
        (["env.goal_index=50"], "'env.goal_index' must be in 0..49"),
        (["replay.samples_per_insert=-1"], "'replay.samples_per_insert' must be >= 0"),
        (["noequals"], "is not of the form key=value"),
    ],
)
def test_bad_input_names_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert fragment in str(err.value)


def test_impossible_combination_dads_from_pixels(tmp_path, monkeypatch):
    # DADS learns from states only; the combination must fail before anything starts.
    import choreo.launch.runtime.config as lc

    monkeypatch.setattr(lc, "CONFIG_DIR", _config_dir_with_dads(tmp_path))
    with pytest.raises(ConfigError, match="'env.obs': DADS learns from states only"):
        lc.load_config(["pixels"], ["algo=dads"])


def _config_dir_with_dads(tmp_path: Path) -> Path:
    import shutil

    import choreo.launch.runtime.config as lc

    d = tmp_path / "configs"
    shutil.copytree(lc.CONFIG_DIR, d)
    (d / "algo" / "dads.yaml").write_text("{}\n")
    return d


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; valid presets: .*tiny"):
        load_config(["huge"])


def test_malformed_yaml_names_the_file(tmp_path, monkeypatch):
    import choreo.launch.runtime.config as lc

    d = _config_dir_with_dads(tmp_path)
    (d / "size" / "tiny.yaml").write_text("agent: {world_model: [unclosed\n")
    monkeypatch.setattr(lc, "CONFIG_DIR", d)
    with pytest.raises(ConfigError, match=r"malformed YAML in .*tiny\.yaml"):
        lc.load_config(["tiny"])


def test_every_field_has_a_docstring():
    missing = [key for key, _tp, doc in iter_fields() if not doc]
    assert missing == []


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


def test_saved_config_reads_back_identical(tmp_path):
    config = load_config(["pixels", "tiny"], ["seed=3"])
    path = RunDir(tmp_path / "run").write_config(config)
    assert path == tmp_path / "run" / "config.yaml"
    assert from_yaml_file(path) == config
    assert yaml.safe_load(to_yaml(config))["env"]["obs"] == "pixels"


def test_cli_prints_resolved_yaml_and_fails_with_exit_2():
    ok = subprocess.run([sys.executable, "-m", "choreo.launch.cli", "config", "--preset", "tiny", "seed=5"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout)
    assert printed["seed"] == 5 and printed["size"] == "tiny"
    bad = subprocess.run([sys.executable, "-m", "choreo.launch.cli", "config", "replay.capacty=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "replay.capacty" in bad.stderr and "did you mean 'replay.capacity'" in bad.stderr


def test_config_default_instance_matches_paper_preset():
    # The paper preset restates the dataclass defaults; they must not drift apart.
    assert load_config(["paper"]).agent == Config().agent


def test_overrides_may_follow_options_on_the_command_line(capsys):
    from choreo.launch import cli

    assert cli.main(["config", "--preset", "tiny", "seed=3", "--explain", "learner.total_frames=5"]) == 0
    out = capsys.readouterr().out
    assert "seed = 3" in out and "learner.total_frames = 5" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["config", "seed=3", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
