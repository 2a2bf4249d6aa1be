"""`choreo export-policy`: a snapshot's acting policy as a TorchScript file that runs with torch
alone. The loaded file acts as choreo's own policy in mode "mode" (explore, skill, meta; states and
pixels; DADS skills), carries its state across steps, and refuses what it cannot export with
errors that name the flag or file; the python block of docs/python-api.md runs it in an
interpreter where importing choreo fails. Tiny networks, a few steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from choreo.launch.cli import main as cli_main
from choreo.launch.commands.export_policy import export_policy
from choreo.launch.runtime.build import env_shapes, make_agent
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.runtime.snapshot import load_snapshot
from choreo.learner.snapshot import SnapshotError, save_snapshot

CODES = 8
DOCS = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
DOCS_MARKER = "<!-- export-policy:"


def snapshot(folder: Path, name: str, *overrides: str, presets: tuple[str, ...] = ("tiny",), finetuned: bool = False,
             gate_open: bool = False) -> Path:
    config = load_config(list(presets), [f"agent.choreographer.num_codes={CODES}", "learner.device=cpu", "seed=5",
                                         *overrides])
    agent = make_agent(config, *env_shapes(config))
    if finetuned:
        agent.finetune_mode()
        agent.gate_open.fill_(gate_open)
    return save_snapshot(folder / name, agent.state_dict(), config, frames=1000, updates=12)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("snapshots")
    return {
        "pretrained": snapshot(folder, "pretrained.pt"),
        "finetuned": snapshot(folder, "finetuned.pt", finetuned=True, gate_open=True),
        "gate_closed": snapshot(folder, "gate_closed.pt", finetuned=True),
        "pixels": snapshot(folder, "pixels.pt", presets=("tiny", "pixels")),
        "dads": snapshot(folder, "dads.pt", "algo=dads", "env.task=point_mass_nav", "agent.dads.omit_coordinates=1"),
        "dads_discrete": snapshot(folder, "dads_discrete.pt", "algo=dads", "env.task=point_mass_nav",
                                  "agent.dads.skill_type=discrete", "agent.dads.skill_dim=4"),
    }


def observations(obs_shape: tuple[int, ...], steps: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if len(obs_shape) == 3:
        return rng.integers(0, 256, (steps, n, *obs_shape), dtype=np.uint8)
    return rng.normal(size=(steps, n, *obs_shape)).astype(np.float32)


@pytest.mark.parametrize("name, flags, behaviour, skill", [
    ("pretrained", {"explore": True}, "explore", None),
    ("pretrained", {"skill": "3"}, "skill", 3),
    ("finetuned", {"meta": True}, "meta", None),
    ("pixels", {"skill": "5"}, "skill", 5),
    ("pixels", {"explore": True}, "explore", None),
])
def test_the_file_acts_as_choreos_deterministic_policy(snapshots, tmp_path, capsys, name, flags, behaviour, skill):
    out = export_policy(snapshots[name], tmp_path / "policy.pt", **flags)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and str(out) in line and str(snapshots[name]) in line
    exported = torch.jit.load(str(out))
    pre = load_snapshot(snapshots[name])
    reference = pre.policy(behaviour, skill=skill)
    n, steps = 3, 5
    assert exported.observation_shape == list(pre.obs_shape) and exported.action_dim == pre.action_dim
    meta = exported.metadata
    assert meta["behaviour"] == behaviour and meta["task"] == "walker_stand"
    assert meta["snapshot"] == str(pre.path.resolve())
    assert meta["action_repeat"] == str(pre.config.env.action_repeat)
    assert ("uint8" if len(pre.obs_shape) == 3 else "float32") in meta["observation"]
    assert "[-1, 1]" in meta["action"]

    state, expected = exported.initial_state(n), reference.initial_state(n)
    for t, obs in enumerate(observations(pre.obs_shape, steps, n)):
        action, state = exported.step(torch.from_numpy(obs), state)
        want, expected, extras = reference.act(obs, np.full(n, t == 0), expected, mode="mode")
        assert action.dtype == torch.float32 and action.shape == (n, pre.action_dim)
        np.testing.assert_allclose(action.numpy(), want, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(state["skill"].numpy(), extras["skill"])
        np.testing.assert_array_equal(state["skill_steps"].numpy(), expected.skill_steps.numpy())
        np.testing.assert_allclose(state["deter"].numpy(), expected.latent.deter.numpy(), rtol=0, atol=1e-6)
    # The state carries the episode: the same observation from a fresh state acts otherwise.
    fresh, _ = exported.step(torch.from_numpy(obs), exported.initial_state(n))
    assert not torch.allclose(fresh, action)
    if behaviour == "skill":
        assert (state["skill"] == skill).all() and (state["skill_steps"] == steps).all()
    if behaviour == "meta":  # a code chosen at every step: held for one step
        assert (state["skill_steps"] == 1).all() and ((state["skill"] >= 0) & (state["skill"] < CODES)).all()


def test_a_row_of_the_skill_state_switches_that_environments_skill(snapshots, tmp_path):
    out = export_policy(snapshots["pretrained"], tmp_path / "policy.pt", skill="3")
    exported = torch.jit.load(str(out))
    reference = load_snapshot(snapshots["pretrained"]).policy("skill")
    state = exported.initial_state(3)
    state["skill"][1] = 6
    expected = reference.initial_state(3, skill=[3, 6, 3])
    for t, obs in enumerate(observations((24,), 3, 3, seed=1)):
        action, state = exported.step(torch.from_numpy(obs), state)
        want, expected, _ = reference.act(obs, np.full(3, t == 0), expected, mode="mode")
        np.testing.assert_allclose(action.numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, text, given", [
    ("dads", "0.5,-0.25", [0.5, -0.25]),
    ("dads_discrete", "2", 2),
])
def test_dads_skills_export_as_the_sac_actors_mean(snapshots, tmp_path, name, text, given):
    exported = torch.jit.load(str(export_policy(snapshots[name], tmp_path / "dads.pt", skill=text)))
    pre = load_snapshot(snapshots[name])
    reference = pre.policy("skill", skill=given)
    state, expected = exported.initial_state(4), reference.initial_state(4)
    for t, obs in enumerate(observations(pre.obs_shape, 3, 4)):
        action, state = exported.step(torch.from_numpy(obs), state)
        want, expected, extras = reference.act(obs, np.full(4, t == 0), expected, mode="mode")
        np.testing.assert_allclose(action.numpy(), want, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(state["skill"].numpy(), extras["skill_vector"])
    assert exported.metadata["algo"] == "dads" and exported.metadata["behaviour"] == "skill"


def test_errors_name_the_flag_and_the_snapshot(snapshots, tmp_path):
    pretrained, out = snapshots["pretrained"], tmp_path / "policy.pt"
    with pytest.raises(ConfigError, match=rf"--skill {CODES}: out of range; .*pretrained.pt has {CODES} codes, give "
                                          rf"one of 0..{CODES - 1}"):
        export_policy(pretrained, out, skill=str(CODES))
    with pytest.raises(ConfigError, match="--skill -1: out of range"):
        export_policy(pretrained, out, skill="-1")
    with pytest.raises(ConfigError, match="--skill two: not an integer"):
        export_policy(pretrained, out, skill="two")
    with pytest.raises(ConfigError, match="--meta: .*pretrained.pt is a pretraining snapshot"):
        export_policy(pretrained, out, meta=True)
    with pytest.raises(ConfigError, match="--meta: .*gate_closed.pt is fine-tuned, but its reward gate never opened"):
        export_policy(snapshots["gate_closed"], out, meta=True)
    with pytest.raises(ConfigError, match="--explore: .*dads.pt is a DADS snapshot"):
        export_policy(snapshots["dads"], out, explore=True)
    with pytest.raises(ConfigError, match="--skill 1: .*continuous DADS skills of 2 dims: give 2"):
        export_policy(snapshots["dads"], out, skill="1")
    with pytest.raises(ConfigError, match="--skill 4: out of range; .*4 discrete skills"):
        export_policy(snapshots["dads_discrete"], out, skill="4")
    with pytest.raises(ConfigError, match=f"--out {tmp_path}: is a folder"):
        export_policy(pretrained, tmp_path, skill="1")
    with pytest.raises(ConfigError, match="give one of --skill K, --explore or --meta"):
        export_policy(pretrained, out, skill="1", explore=True)
    with pytest.raises(SnapshotError, match="none.pt: no such file"):
        export_policy(tmp_path / "none.pt", out, skill="1")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_the_command_line(snapshots, tmp_path, capsys):
    out = tmp_path / "sub" / "policy.pt"
    out.parent.mkdir()
    out.write_bytes(b"an older file")
    assert cli_main(["export-policy", str(snapshots["pretrained"]), "--explore", "--out", str(out)]) == 0
    assert "exported the exploration policy from" in capsys.readouterr().out
    assert torch.jit.load(str(out)).metadata["behaviour"] == "explore"  # replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy.pt"]
    assert cli_main(["export-policy", str(snapshots["pretrained"]), "--meta", "--out", str(out)]) == 2
    assert "choreo: error: --meta:" in capsys.readouterr().err
    assert cli_main(["export-policy", str(tmp_path / "none.pt"), "--skill", "1", "--out", str(out)]) == 2
    assert "none.pt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exactly one of --skill, --explore, --meta
        cli_main(["export-policy", str(snapshots["pretrained"]), "--out", str(out)])


def test_bad_inputs_to_the_file_name_what_is_wrong(snapshots, tmp_path):
    exported = torch.jit.load(str(export_policy(snapshots["pretrained"], tmp_path / "policy.pt", skill="1")))
    with pytest.raises(Exception, match=r"observation of shape \[24\]; this policy takes \[B\] \+ \[24\]"):
        exported.step(torch.zeros(24), exported.initial_state(1))
    with pytest.raises(Exception, match=r"a state of 2 environments for 3 observations"):
        exported.step(torch.zeros(3, 24), exported.initial_state(2))


def docs_block() -> str:
    """The python block of docs/python-api.md that follows DOCS_MARKER."""
    text = DOCS.read_text()
    start = text.find(DOCS_MARKER)
    assert start >= 0, f"{DOCS} no longer has {DOCS_MARKER!r}"
    block = text[start:].split("```python\n", 1)[1]
    return block.split("```", 1)[0]


NO_CHOREO = """\
import sys


class NoChoreo:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "choreo":
            raise ImportError(f"{name} imported: the exported policy must run without choreo")


sys.meta_path.insert(0, NoChoreo())
"""


def test_the_documented_loop_runs_the_file_without_choreo(snapshots, tmp_path):
    export_policy(snapshots["pretrained"], tmp_path / "walker_skill3.pt", skill="3")
    code = NO_CHOREO + docs_block() + "\nassert not [m for m in sys.modules if m.split('.')[0] == 'choreo']\n"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"docs/python-api.md's loop failed:\n{done.stderr[-3000:]}"
    assert done.stdout.startswith("return ")
