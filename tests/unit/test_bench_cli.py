"""Options of `choreo bench pretrain` and `choreo bench soak`: defaults, overrides and clear errors
for bad values. Parsing only: nothing here starts Ray or a run."""

from __future__ import annotations

import sys

import pytest

from choreo.launch import bench
from choreo.launch.bench import pretrain as bench_pretrain, soak as bench_soak
from choreo.launch.cli import build_parser, main
from choreo.launch.runtime.config import ConfigError


def test_bench_help_lists_both(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "soak" in out
    assert bench.BENCHMARKS["pretrain"] == "choreo.launch.bench.pretrain"
    assert bench.BENCHMARKS["soak"] == "choreo.launch.bench.soak"


@pytest.mark.parametrize("what", ["pretrain", "soak"])
def test_cli_routes_to_the_benchmark(what, monkeypatch):
    args = build_parser().parse_args(["bench", what, "--minutes" if what == "soak" else "--frames", "3", "seed=4"])
    assert args.what == what and args.rest == ["--minutes" if what == "soak" else "--frames", "3", "seed=4"]
    seen = {}
    module = bench_soak if what == "soak" else bench_pretrain
    monkeypatch.setattr(module, "run", lambda rest, as_json=False: seen.update(rest=rest, as_json=as_json) or 0)
    assert main(["bench", what, "--json", "seed=4"]) == 0
    assert seen == {"rest": ["seed=4"], "as_json": True}


# ----------------------------------------------------------------------------- pretrain


def test_pretrain_defaults():
    args, config = bench_pretrain.parse([])
    assert args.preset == ["tiny"] and config.size == "tiny"
    assert config.env.task.startswith("walker") and config.env.obs == "states"
    assert config.num_actors == 2 and config.num_shards == 1
    assert config.learner.total_frames == bench_pretrain.DEFAULT_FRAMES
    assert args.repeats == 1 and args.seconds is None and args.logdir is None and not args.json


def test_pretrain_overrides():
    args, config = bench_pretrain.parse(["--frames", "5000", "--repeats", "3", "--seconds", "90", "--logdir", "/x",
                                         "num_actors=4", "num_shards=2", "replay.samples_per_insert=0"])
    assert config.learner.total_frames == 5000
    assert config.num_actors == 4 and config.num_shards == 2 and config.replay.samples_per_insert == 0
    assert args.repeats == 3 and args.seconds == 90.0 and args.logdir == "/x"


def test_pretrain_paper_preset_replaces_tiny():
    args, config = bench_pretrain.parse(["--preset", "paper", "--frames", "6000"])
    assert args.preset == ["paper"] and config.size == "paper"
    assert config.agent.world_model.deter == 200 and config.learner.total_frames == 6000


@pytest.mark.parametrize("argv, message", [
    (["--frames", "0"], "--frames must be positive"),
    (["--frames", "lots"], "--frames takes an integer"),
    (["--repeats", "-1"], "--repeats must be positive"),
    (["--seconds", "nan"], "--seconds must be positive"),
    (["--bogus"], "unrecognized arguments"),
])
def test_pretrain_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_pretrain.parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "choreo bench pretrain" in err and message in err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["num_actors=0"], "num_actors"),
    (["no_such_key=1"], "no_such_key"),
    (["num_actors"], "key=value"),
])
def test_pretrain_bad_config(argv, message):
    with pytest.raises(ConfigError, match=message):
        bench_pretrain.parse(argv)


def test_bad_config_is_a_clear_cli_error(capsys):
    assert main(["bench", "pretrain", "num_actors=0"]) == 2
    assert "choreo: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- soak


def test_soak_defaults():
    args, config = bench_soak.parse([])
    assert args.minutes == 10.0 and args.kill_actor_every == 120.0 and args.kill_shard_every == 300.0
    assert config.size == "tiny" and config.num_actors == 4 and config.num_shards == 2
    assert config.learner.checkpoint_minutes == 1.0
    assert config.learner.total_frames >= 10**12  # the run never finishes by itself


def test_soak_overrides_win_over_its_defaults():
    args, config = bench_soak.parse(["--minutes", "30", "--kill-actor-every", "0", "--kill-shard-every", "60.5",
                                     "--seed", "7", "num_actors=3", "learner.checkpoint_minutes=2"])
    assert args.minutes == 30.0 and args.kill_actor_every == 0.0 and args.kill_shard_every == 60.5
    assert args.seed == 7 and config.num_actors == 3 and config.num_shards == 2
    assert config.learner.checkpoint_minutes == 2.0


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0"], "--minutes must be positive"),
    (["--minutes", "-5"], "--minutes must be positive"),
    (["--minutes", "half"], "--minutes takes a number"),
    (["--kill-actor-every", "-1"], "--kill-actor-every must be a number of seconds >= 0"),
    (["--kill-shard-every", "soon"], "--kill-shard-every takes seconds"),
    (["--kill-shard-every", "inf"], "--kill-shard-every must be a number of seconds >= 0"),
])
def test_soak_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_soak.parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "choreo bench soak" in err and message in err


def test_soak_bad_config():
    with pytest.raises(ConfigError, match="num_shards"):
        bench_soak.parse(["num_shards=0"])


def test_nothing_started_ray():
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


@pytest.mark.parametrize("as_json", [False, True])
def test_run_lines_leave_stdout_to_the_json(as_json, monkeypatch, capsys, tmp_path):
    """With --json the driver's own lines go to stderr, and a temporary run directory is removed."""
    import choreo.launch.runtime.distributed

    seen = {}

    def fake_drive(config, run_dir, on_tick=None):
        seen["run_dir"] = run_dir
        assert (run_dir / "config.yaml").exists()
        print("Ray: 2 environment workers")
        return "driver"

    monkeypatch.setattr(choreo.launch.runtime.distributed, "drive", fake_drive)
    monkeypatch.setattr(bench_pretrain.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _, config = bench_pretrain.parse([])
    driver, run_dir = bench_pretrain.drive_in_new_run(config, None, None, "choreo-test-", as_json)
    assert driver == "driver" and run_dir == seen["run_dir"]
    out, err = capsys.readouterr()
    assert ("Ray: 2 environment workers" in err) == as_json
    assert ("Ray: 2 environment workers" in out) != as_json
    assert not (tmp_path / "tmp").exists()


def test_soak_counts_terminal_rows_as_an_80_column_terminal_shows_them():
    from choreo.launch.bench.soak import terminal_rows

    assert terminal_rows("") == 1
    assert terminal_rows("x" * 80) == 1 and terminal_rows("x" * 81) == 2 and terminal_rows("x" * 161) == 3
    assert terminal_rows("\r" + "a" * 100 + "\r" + "b" * 10) == 2  # the longest redraw wraps
    assert terminal_rows("\x1b[31m" + "r" * 80 + "\x1b[0m") == 1  # colours take no columns
