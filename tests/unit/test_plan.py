"""`choreo plan` pieces without Ray: the planners' reward bound to each environment's goal, the
episode positions the runner records, the summary's normalised distance, and the errors that
name what is wrong before anything starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from choreo.actors.envs import make_env
from choreo.actors.runner import EnvRunner
from choreo.launch import cli
from choreo.launch.commands.plan import goal_rewards, summarise


class Still:
    """A policy that does not move: zero actions."""

    version = 0

    def __init__(self, action_dim: int = 2) -> None:
        self.action_dim = action_dim

    def initial_state(self, n):
        return None

    def act(self, observation, is_first, state, mode="sample"):
        return np.zeros((len(observation), self.action_dim), np.float32), state, {"skill": np.full(len(observation), -1, np.int32)}


def test_the_planners_reward_uses_each_environments_own_goal():
    envs = [make_env("point_mass_nav", seed=i) for i in range(3)]
    for env, goal in zip(envs, ([1.0, 2.0], [-3.0, 0.0], [0.0, 4.0])):
        env.reset()
        env.unwrapped.set_goal(np.array(goal))
    reward = goal_rewards(envs)
    obs = torch.zeros(2, 5, 3, 4)  # [M, K, H, D]: every predicted position at the origin
    obs[1, 2, 0, :2] = torch.tensor([0.0, 4.0])  # one candidate of env 2 reaches its goal at its first step
    out = reward(obs, torch.tensor([0, 2]))
    assert out.shape == (2, 5, 3) and out.dtype == obs.dtype
    assert torch.allclose(out[0], torch.full((5, 3), -np.sqrt(5.0)))
    assert out[1, 2, 0] == 0 and torch.allclose(out[1, 0], torch.full((3,), -4.0))


def test_the_runner_records_each_episodes_positions_and_goal():
    envs = [make_env("point_mass_nav", seed=i) for i in range(2)]
    out = EnvRunner(envs, Still(), 1, 0, 0, mode="mode").evaluate(3, positions=True)
    assert len(out["xy"]) == len(out["goals"]) == 3
    for xy, goal, ret in zip(out["xy"], out["goals"], out["returns"]):
        xy = np.asarray(xy)
        assert xy.shape == (201, 2) and np.allclose(xy, 0)  # 200 steps at action repeat 1, standing still
        assert ret == pytest.approx(-200 * np.linalg.norm(goal))
    assert out["goals"][0] != out["goals"][2]  # the same environment draws a new goal per episode
    with pytest.raises(ValueError, match="no x-y position"):
        EnvRunner([make_env("walker_stand", seed=0)], Still(6), 1, 0, 0).evaluate(1, positions=True)


def test_summary_of_episodes():
    jobs = [{"returns": [-10.0, -30.0], "xy": [[[0, 0], [1, 0], [2, 0]], [[0, 0], [0, 0], [0, 0]]],
             "goals": [[4, 0], [0, 2]]}]
    episodes, summary = summarise(jobs)
    assert [e["normalised_distance"] for e in episodes] == pytest.approx([(3 / 4 + 2 / 4) / 2, 1.0])
    assert summary["normalised_distance"] == pytest.approx((0.625 + 1.0) / 2)
    assert summary["normalised_distance_se"] == pytest.approx(np.std([0.625, 1.0], ddof=1) / np.sqrt(2))
    assert summary["final_distance"] == pytest.approx(2.0) and summary["mean_return"] == -20.0


def test_plan_refuses_what_it_cannot_run(tmp_path, capsys):
    from choreo.launch.runtime.config import load_config
    from choreo.launch.runtime.build import make_agent
    from choreo.learner.snapshot import save_snapshot

    assert cli.main(["plan", "--snapshot", str(tmp_path / "none.pt"), "task=point_mass_nav"]) == 2
    assert "no such file" in capsys.readouterr().err
    config = load_config(["tiny"], ["env.task=walker_stand"])
    agent = make_agent(config, (24,), 6)
    snapshot = save_snapshot(tmp_path / "s.pt", agent.state_dict(), config, 100, 1)
    assert cli.main(["plan", "--snapshot", str(snapshot), "--logdir", str(tmp_path / "runs")]) == 2
    assert "use a navigation task" in capsys.readouterr().err
    assert cli.main(["plan", "--snapshot", str(snapshot), "task=point_mass_nav", "--logdir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err  # a walker agent does not fit the point mass
    assert "s.pt" in err and not (tmp_path / "r").exists()
