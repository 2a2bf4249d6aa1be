"""The run plan: every mode resolved once from its config, the start-up decisions of both loops, and
size presets that bound every mode (the `when` rules of the presets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from choreo.launch.runtime import config as config_module
from choreo.launch.runtime.config import ConfigError, in_mode, load_config
from choreo.launch.runtime.plan import resolve_plan

ROOT = Path(__file__).resolve().parents[2]


def tiny(*overrides: str, presets=("tiny",)):
    return load_config(list(presets), list(overrides))


def updates_per_frame(config) -> float:
    """Learner updates a run with workers trains per frame, at its replay ratio."""
    rc = config.replay
    return rc.samples_per_insert / (rc.batch_size * rc.batch_length * config.env.action_repeat)


@pytest.mark.parametrize("name, overrides, expected", [
    ("pretrain", [], dict(mode="pretrain", phase="pretrain", workers=True, unit="frames", total=2000,
                          behaviour="explore", start="new", seed_frames=200, label="pretrain")),
    ("offline", ["dataset.dir=/data"], dict(mode="pretrain", phase="offline", workers=False, dataset="/data",
                                            unit="updates", total=200, seed_frames=0)),
    ("offline and collect", ["dataset.dir=/data", "dataset.collect=true"],
     dict(phase="pretrain", workers=True, dataset="/data", unit="frames", total=2000, seed_frames=0)),
    ("finetune", ["mode=finetune", "snapshot=/s.pt"], dict(mode="finetune", phase="finetune", workers=True,
                                                           unit="frames", total=2000, eval_every=1000,
                                                           behaviour="meta", start="snapshot", label="finetune")),
    ("scratch", ["mode=finetune", "from_scratch=true"], dict(start="scratch", label="scratch", seed_frames=0)),
    ("evaluate", ["mode=evaluate", "snapshot=/s.pt"], dict(mode="evaluate", phase="none", workers=False,
                                                           unit="episodes", total=2, behaviour="meta")),
    ("dads", ["algo=dads"], dict(mode="pretrain", phase="pretrain", unit="frames", total=2000)),
])
def test_every_mode_resolves_to_one_plan(name, overrides, expected):
    plan = resolve_plan(tiny(*overrides))
    for key, value in expected.items():
        assert getattr(plan, key) == value, (name, key, getattr(plan, key))


def test_tiny_bounds_every_command():
    """`--preset tiny` is seconds long in every mode: its frames, updates and episodes are few,
    although the fine-tuning and evaluation protocols (100k frames, 100 episodes) compose after it."""
    bounds = {"frames": 2000, "updates": 200, "episodes": 2}
    configs = {
        "pretrain": tiny(),
        "offline": tiny("dataset.dir=/data"),
        "finetune": tiny("mode=finetune", "snapshot=/s.pt"),
        "finetune --from-scratch": tiny("mode=finetune", "from_scratch=true"),
        "evaluate": tiny("mode=evaluate", "snapshot=/s.pt"),
        "evaluate metaworld": tiny("mode=evaluate", "suite=metaworld", "snapshot=/s.pt"),
        "plan": in_mode(tiny(), "plan"),
        "dads": tiny("algo=dads"),
        "dads plan": in_mode(tiny("algo=dads"), "plan"),
    }
    for name, config in configs.items():
        plan = resolve_plan(config)
        assert plan.total <= bounds[plan.unit], (name, plan.unit, plan.total)
        if plan.workers:  # the updates that many frames buy at the run's replay ratio
            assert plan.total * updates_per_frame(config) <= 250, (name, plan.total * updates_per_frame(config))
        if plan.eval_every:
            assert config.eval.episodes <= 2 and plan.total // plan.eval_every <= 2, name
    # and the protocols stay what they are at the other sizes
    assert resolve_plan(load_config([], ["mode=finetune", "from_scratch=true"])).total == 100_000
    assert resolve_plan(load_config(["small"], ["mode=finetune", "from_scratch=true"])).total == 100_000
    assert load_config([], ["mode=evaluate", "snapshot=/s.pt"]).eval.episodes == 100
    assert resolve_plan(in_mode(load_config([], []), "plan")).total == 50
    assert resolve_plan(load_config(["small"], ["dataset.dir=/d"])).total == 5000


def test_overrides_win_over_the_presets_rules():
    config = tiny("mode=finetune", "from_scratch=true", "learner.total_frames=3000", "eval.episodes=4")
    assert resolve_plan(config).total == 3000 and config.eval.episodes == 4


def test_a_saved_config_put_into_another_mode_keeps_its_sizes():
    saved = tiny("agent.world_model.deter=40", "dataset.dir=/d")
    planned = in_mode(saved, "plan", ["dataset.dir=", "eval.episodes=3"])
    assert planned.mode == "plan" and planned.agent.world_model.deter == 40
    assert planned.eval.episodes == 3 and not planned.dataset.dir


@pytest.mark.parametrize("workers, dataset, resume, saved, expected", [
    # new runs read their dataset; workers' replays are saved at every checkpoint
    (True, "", False, False, dict(load_dataset=False, restore_replay=False, save_replay="every checkpoint")),
    (False, "/d", False, False, dict(load_dataset=True, restore_replay=False, save_replay="once")),
    (True, "/d", False, False, dict(load_dataset=True, save_replay="every checkpoint", skip_random_steps=False)),
    # resumed: the replay checkpoint holds the dataset, random steps are over
    (True, "", True, True, dict(load_dataset=False, restore_replay=True, skip_random_steps=True,
                                load_checkpoint=True)),
    (True, "/d", True, True, dict(load_dataset=False, restore_replay=True)),
    (False, "/d", True, True, dict(load_dataset=False, restore_replay=True, save_replay="never")),
    # an offline run resumed before its replay was first saved reads the dataset again
    (False, "/d", True, False, dict(load_dataset=True, restore_replay=False, save_replay="once")),
])
def test_start_up_decisions(workers, dataset, resume, saved, expected):
    overrides = [f"dataset.dir={dataset}"] if dataset else []
    if dataset and workers:
        overrides.append("dataset.collect=true")
    plan = resolve_plan(tiny(*overrides))
    assert plan.workers == workers
    start = plan.startup(resume, saved)
    for key, value in expected.items():
        assert getattr(start, key) == value, key


def test_a_malformed_when_rule_names_the_file(tmp_path, monkeypatch):
    for group in ("suite", "size", "algo", "mode"):
        (tmp_path / group).mkdir()
    (tmp_path / "base.yaml").write_text("algo: choreographer\nsuite: states\nsize: paper\n")
    for group, name in (("suite", "states"), ("algo", "choreographer"), ("mode", "pretrain")):
        (tmp_path / group / f"{name}.yaml").write_text("{}\n")
    (tmp_path / "size" / "paper.yaml").write_text("when:\n  - {colour: red, set: {seed: 3}}\n")
    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"paper\.yaml.*names groups"):
        load_config()
    (tmp_path / "size" / "paper.yaml").write_text("when:\n  - {mode: pretrain, set: {seed: 3}}\n"
                                                  "  - {mode: finetune, set: {seed: 4}}\n")
    assert load_config().seed == 3


def test_only_the_plan_decides_what_a_mode_means():
    """No module of launch/ but the plan and the config's validation compares the mode string or
    derives the offline flag again."""
    pattern = re.compile(r"config\.mode\b|\.mode\s*[!=]=\s*\"(pretrain|finetune|evaluate|plan)\"|offline_only|"
                         r"dataset\.collect\b(?!=)|config\.from_scratch")
    allowed = {"launch/runtime/plan.py", "launch/runtime/config.py"}
    found = []
    for path in sorted((ROOT / "launch").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "decide through launch/runtime/plan.py's RunPlan:\n" + "\n".join(found)
