"""Using a pretrained agent from Python (`choreo.load_snapshot`, launch/runtime/snapshot.py): one call
from a snapshot file to the config, the agent with its weights, acting policies, environments and
skill rollouts; clear errors naming what is wrong. Also: `--local` honours learner.threads, and
`choreo pretrain` prints the run directory first. Tiny networks, a few steps."""

from __future__ import annotations

import io
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch

import choreo
from choreo.actors.envs import make_env_from_config
from choreo.launch.runtime.build import env_shapes, make_agent
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.runtime.snapshot import Pretrained, rollout
from choreo.learner.snapshot import SnapshotError, save_snapshot
from choreo.vocabulary import derive_seed

CODES = 4


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    config = load_config(["tiny"], [f"agent.choreographer.num_codes={CODES}", "learner.device=cpu", "seed=7"])
    agent = make_agent(config, *env_shapes(config))
    path = tmp_path_factory.mktemp("walker") / "snapshot_1000.pt"
    save_snapshot(path, agent.state_dict(), config, frames=1000, updates=12)
    return path, agent


@pytest.fixture(scope="module")
def point_mass(tmp_path_factory):
    config = load_config(["tiny"], ["algo=dads", "env.task=point_mass_nav", "learner.device=cpu"])
    agent = make_agent(config, *env_shapes(config))
    path = tmp_path_factory.mktemp("point_mass") / "snapshot_1000.pt"
    save_snapshot(path, agent.state_dict(), config, frames=1000, updates=3)
    return path


def test_load_snapshot_is_one_call(walker):
    path, saved = walker
    pre = choreo.load_snapshot(path, "seed=3", task="walker_run")
    assert isinstance(pre, Pretrained) and pre.path == path
    assert pre.config.env.task == "walker_run" and pre.config.seed == 3  # the overrides
    assert pre.config.agent.choreographer.num_codes == CODES  # the rest is the run's own
    assert pre.obs_shape == (24,) and pre.action_dim == 6
    assert (pre.frames, pre.updates, pre.num_skills, pre.skill_type) == (1000, 12, CODES, "code")
    for name, value in saved.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(pre.agent.state_dict()[name], value), name
    assert choreo.load_snapshot(path, "task=walker_walk").config.env.task == "walker_walk"  # as on the command line
    assert "walker_run" in repr(pre)


def test_import_choreo_stays_cheap():
    code = ("import sys, choreo; assert 'torch' not in sys.modules and 'choreo.launch' not in sys.modules; "
            "assert callable(choreo.load_snapshot) and choreo.Pretrained.__name__ == 'Pretrained'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        choreo.nonsense  # noqa: B018


def test_errors_name_the_file_and_what_is_wrong(walker, tmp_path):
    path, _ = walker
    with pytest.raises(SnapshotError, match=f"{tmp_path / 'none.pt'}: no such file"):
        choreo.load_snapshot(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="bad.pt"):
        choreo.load_snapshot(tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'agent.nonsense'"):
        choreo.load_snapshot(path, "agent.nonsense=1")
    with pytest.raises(SnapshotError, match="does not fit.*env.task"):  # another domain: other shapes
        choreo.load_snapshot(path, task="quadruped_walk")
    with pytest.raises(SnapshotError, match="world_model.deter"):
        choreo.load_snapshot(path, "agent.world_model.deter=16")


def test_policies_carry_the_snapshot_weights(walker):
    path, _ = walker
    pre = choreo.load_snapshot(path)
    weights = pre.agent.policy_weights()
    explore = pre.policy("explore", seed=1)
    assert explore.version == 12
    for name, value in explore.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights[name])
    skill = pre.policy()  # behaviour "skill"
    with pytest.raises(ValueError, match="skill behaviour runs the skills you choose"):
        skill.initial_state(2)
    obs = np.zeros((2, 24), np.float32)
    _, _, extras = skill.act(obs, np.ones(2, bool), skill.initial_state(2, skill=np.array([3, 1])), mode="mode")
    assert extras["skill"].tolist() == [3, 1]
    preset = pre.policy("skill", skill=2)  # initial_state(n) alone, as an EnvRunner calls it
    assert preset.initial_state(3).skill.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="unknown behaviour"):
        pre.policy("dance")
    envs = pre.make_envs(2, seed=4)  # a gymnasium vector environment
    try:
        assert isinstance(envs, gymnasium.vector.SyncVectorEnv) and envs.num_envs == 2
        assert tuple(envs.single_observation_space.shape) == pre.obs_shape
        assert envs.single_action_space.shape == (pre.action_dim,)
        obs, _ = envs.reset()
        assert obs.shape == (2, *pre.obs_shape)
        single = make_env_from_config(pre.config.env, seed=derive_seed(4, "env", 1))  # environment 1's own seed
        np.testing.assert_array_equal(obs[1], single.reset()[0])
        single.close()
        obs, reward, terminated, truncated, _ = envs.step(envs.action_space.sample())
        assert obs.shape == (2, *pre.obs_shape) and reward.shape == (2,) and not terminated.any()
    finally:
        envs.close()


def test_run_skills_plays_each_environment_with_its_skill(walker):
    path, _ = walker
    pre = choreo.load_snapshot(path)
    skills = np.array([0, 3, 3])
    out = pre.run_skills(skills, steps=4)
    assert out["observations"].shape == (3, 5, 24) and out["observations"].dtype == np.float32
    assert out["actions"].shape == (3, 4, 6) and np.all(np.abs(out["actions"]) <= 1)
    assert out["rewards"].shape == (3, 4) and out["is_first"].shape == (3, 5)
    assert out["is_first"][:, 0].all() and not out["is_first"][:, 1:].any()
    assert "xy" not in out  # walker is no navigation task
    np.testing.assert_array_equal(out["skills"], skills)
    # Deterministic in mode "mode"; environments 1 and 2 differ only by their reset seeds.
    again = pre.run_skills([0, 3, 3], steps=4)
    for key in ("observations", "actions", "rewards"):
        np.testing.assert_array_equal(out[key], again[key])
    assert not np.array_equal(out["observations"][1], out["observations"][2])
    # The actions are the skill policy's, acting on the observations through its recurrent state.
    policy = pre.policy("skill")
    state = policy.initial_state(3, skill=skills)
    for t in range(4):
        action, state, _ = policy.act(out["observations"][:, t], out["is_first"][:, t], state, mode="mode")
        np.testing.assert_array_equal(action, out["actions"][:, t])
    # Given environments are used as they are (and left open), the vector environment of make_envs
    # or its single ones; "sample" is seeded.
    envs = pre.make_envs(2, seed=9)
    try:
        a = pre.run_skills([1, 2], steps=3, envs=envs, mode="sample", seed=5)
        b = pre.run_skills([1, 2], steps=3, envs=envs.envs, mode="sample", seed=5)
        np.testing.assert_array_equal(a["actions"], b["actions"])
        c = pre.run_skills([1, 2], steps=3, envs=envs, mode="mode", seed=5)
        assert not np.array_equal(a["actions"], c["actions"])
        envs.reset()  # and the vector environment still steps
        assert envs.step(np.zeros((2, 6), np.float32))[0].shape == (2, 24)
    finally:
        envs.close()


def test_run_skills_refuses_what_it_cannot_run(walker, point_mass):
    path, _ = walker
    pre = choreo.load_snapshot(path)
    for skills, match in (([0, CODES], f"skill {CODES} is out of range 0..{CODES - 1}"),
                          ([-1], "skill -1 is out of range"),
                          ([[0, 1]], r"one integer code per environment.*shape \(1, 2\)"),
                          ([0.5, 1.0], "one integer code per environment"),
                          (2, r"an array \[N\] of codes"),
                          ([], "one integer code per environment")):
        with pytest.raises(ValueError, match=match):
            pre.run_skills(skills, steps=2)
    with pytest.raises(ValueError, match="steps must be an integer of at least 1"):
        pre.run_skills([0], steps=0)
    with pytest.raises(ValueError, match="unknown mode 'mean'"):
        pre.run_skills([0], steps=1, mode="mean")
    envs = pre.make_envs(1)
    try:
        with pytest.raises(ValueError, match="2 skills for 1 environments"):
            pre.run_skills([0, 1], steps=1, envs=envs)
    finally:
        envs.close()
    other = choreo.load_snapshot(point_mass).make_envs(1)
    try:
        with pytest.raises(ValueError, match=rf"environment 0 has observations \(4,\).*{path}"):
            pre.run_skills([0], steps=1, envs=other)
    finally:
        other.close()


def test_dads_skills_are_vectors_and_navigation_reports_positions(point_mass):
    pre = choreo.load_snapshot(point_mass)
    assert (pre.skill_type, pre.num_skills) == ("continuous", 2)
    skills = np.array([[0.5, -0.5], [1.0, 0.0], [-1.0, 1.0]], np.float32)
    out = pre.run_skills(skills, steps=3)
    assert out["xy"].shape == (3, 4, 2)
    np.testing.assert_allclose(out["xy"], out["observations"][..., :2], atol=1e-6)  # x-y are dims 0, 1
    again = pre.run_skills(skills, steps=3)
    np.testing.assert_array_equal(out["actions"], again["actions"])
    with pytest.raises(ValueError, match=r"one vector of 2 numbers per environment, an array \[N, 2\]"):
        pre.run_skills(np.zeros((3, 3)), steps=1)
    with pytest.raises(ValueError, match="finite"):
        pre.run_skills(np.array([[np.nan, 0.0]]), steps=1)
    # The DADS policy holds skills set on it, as the Choreographer one does.
    policy = pre.policy("skill", skill=[0.25, 0.75])
    _, _, extras = policy.act(np.zeros((2, 4), np.float32), np.ones(2, bool), policy.initial_state(2), mode="mode")
    np.testing.assert_array_equal(extras["skill_vector"], [[0.25, 0.75]] * 2)


def test_dads_discrete_skills_as_indices():
    from choreo.agents.registry import make_policy

    config = load_config(["tiny"], ["algo=dads", "env.task=point_mass_nav", "agent.dads.skill_type=discrete",
                                    "agent.dads.skill_dim=3"])
    policy = make_policy("dads", (4,), 2, config.agent, behaviour="skill")
    state = policy.initial_state(2, skill=np.array([2, 0]))
    np.testing.assert_array_equal(state.skill_vector.numpy(), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="skill 3 is out of range 0..2"):
        policy.initial_state(2, skill=np.array([3, 0]))
    policy.set_skills(1)
    assert policy.initial_state(2).skill_vector.argmax(-1).tolist() == [1, 1]


# ----------------------------------------------------------------------------- the loop


class Corridor:
    """A fake navigation environment: x grows by the action, the episode ends after 3 steps."""

    class Space:
        def __init__(self, shape):
            self.shape = shape

    observation_space, action_space = Space((2,)), Space((1,))

    def __init__(self) -> None:
        self.resets: list[int | None] = []

    def reset(self, seed=None):
        self.resets.append(seed)
        self.x, self.t = 0.0, 0
        return np.array([self.x, 0.0], np.float32), {"xy": np.array([self.x, 0.0])}

    def step(self, action):
        self.x += float(action[0])
        self.t += 1
        return np.array([self.x, 0.0], np.float32), 1.0, self.t == 3, False, {"xy": np.array([self.x, 0.0])}


class Counter:
    """A policy that acts 0.5 and counts steps since is_first in its state."""

    def act(self, observation, is_first, state, mode="mode"):
        state = np.where(is_first, 1, state + 1)
        return np.full((len(observation), 1), 0.5, np.float32), state, {}


def test_rollout_restarts_episodes_and_reports_every_observation():
    envs = [Corridor(), Corridor()]
    seen = []
    out = rollout(Counter(), envs, 5, state=np.zeros(2, int), seeds=[11, 12],
                  record=("observations", "actions", "rewards", "is_first", "xy"),
                  on_act=lambda t, obs, state: seen.append((t, obs[:, 0].copy(), state.copy())))
    assert envs[0].resets == [11, None] and envs[1].resets == [12, None]  # seeded first, then restarted
    np.testing.assert_array_equal(out["observations"][0, :, 0], [0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(out["is_first"][0], [True, False, False, True, False, False])
    np.testing.assert_array_equal(out["rewards"][0], [1.0] * 5)
    np.testing.assert_array_equal(out["xy"][0, :, 0], out["observations"][0, :, 0])
    assert [t for t, _, _ in seen] == list(range(6))  # the last observation is acted on too, with on_act
    assert seen[3][2].tolist() == [1, 1]  # the policy's state was reset at the new episode
    assert rollout(Counter(), [Corridor()], 2, state=np.zeros(1, int))["actions"].shape == (1, 2, 1)


# ----------------------------------------------------------------------------- the commands


def test_local_runs_take_the_learner_threads(tmp_path, monkeypatch):
    from choreo.launch.runtime import local

    before = torch.get_num_threads()
    config = load_config(["tiny"], ["learner.threads=1"])
    seen = []
    monkeypatch.setattr(local, "_run", lambda *args: seen.append(torch.get_num_threads()) or 0)
    assert local.run_local(config, tmp_path) == 0
    assert seen == [1] and torch.get_num_threads() == before  # set for the run, restored afterwards


class Recorder(io.StringIO):
    """stdout as a file or a pipe: what was written is visible only once flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()

    def isatty(self) -> bool:
        return False


def test_pretrain_prints_the_run_directory_first(tmp_path, monkeypatch):
    from choreo.launch.runtime import local
    from choreo.launch.cli import main
    from choreo.launch.runtime.signals import signals_stop_the_run

    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    seen = []

    def loop(config, run_dir, resume=False):
        seen.append(stdout.flushed)  # what a log file holds when the loop starts
        return 0

    monkeypatch.setattr(local, "run_local", loop)
    with signals_stop_the_run():
        assert main(["pretrain", "--local", "--preset", "tiny", "--logdir", str(tmp_path), "run_name=r"]) == 0
    assert seen[0].splitlines()[0] == f"run directory: {tmp_path.resolve() / 'r'}"
