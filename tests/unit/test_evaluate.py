"""Zero-shot evaluation: jobs are planned per goal (Meta-World) or in slices of episodes, and a
scripted policy that reaches the sparse reward in known episodes is counted exactly."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

from choreo.actors.runner import EnvRunner
from choreo.launch.runtime.config import load_config
from choreo.launch.commands.evaluate import JOB_EPISODES, plan_jobs, success_threshold, summarise, summary_line


class ReachEnv(gymnasium.Env):
    """Episodes of 5 steps; the reward is 1 at a step where the action's first entry exceeds 0.5
    (the goal is reached), else 0."""

    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), float(action[0] > 0.5), False, self.t >= 5, {}


class ScriptedPolicy:
    """Reaches the goal in the episodes listed in `reach` (counted per environment, in the order
    the runner plays them: env i plays episodes i, i + N, ...)."""

    def __init__(self, reach: set[int], num_envs: int) -> None:
        self.reach, self.n, self.version = reach, num_envs, 0
        self.episode = np.arange(num_envs) - num_envs  # becomes env index on the first is_first

    def initial_state(self, n):
        return None

    def act(self, observation, is_first, state, mode="sample"):
        self.episode = np.where(is_first, self.episode + self.n, self.episode)
        go = np.array([e in self.reach for e in self.episode], np.float32)
        return go[:, None], state, {}

    def load_weights(self, arrays, version):
        pass


def test_a_scripted_policy_is_counted_exactly():
    envs = [ReachEnv() for _ in range(3)]
    runner = EnvRunner(envs, ScriptedPolicy({1, 4, 6}, 3), chunk_length=4, runner_id=0, seed=0)
    out = runner.evaluate(8)
    assert out["max_rewards"] == [0, 1, 0, 0, 1, 0, 1, 0]
    jobs = [{"goal": None, **out}]
    summary = summarise("jaco_reach_top_left", jobs, threshold=1e-4)
    assert summary["episodes"] == 8 and summary["episodes_found"] == 3 and summary["episode_success"] == 3 / 8
    assert summary["success"] == 3 / 8  # returns of 5 and 0 against 1e-4


def test_an_episode_succeeds_when_its_return_exceeds_the_reference_threshold():
    # Jaco: return > 1e-4 (a return of exactly 1e-4 does not count); the largest step reward plays no part:
    # the second episode pays 5e-5 at every one of its steps and succeeds, the fourth pays 1e-4 once and does not.
    jaco = summarise("jaco_reach_top_left", [{"goal": None, "returns": [5e-5, 2e-4, 0.0, 1e-4],
                                              "max_rewards": [5e-5, 5e-5, 0.0, 1e-4]}],
                     success_threshold("jaco_reach_top_left"))
    assert success_threshold("jaco_reach_top_left") == 1e-4 and success_threshold("mw_reach") == 0.0
    assert jaco["episodes_found"] == 1 and jaco["success"] == jaco["episode_success"] == 0.25
    assert jaco["threshold"] == 1e-4 and "return > 0.0001" in jaco["success_rule"]
    # Meta-World: return > 0 (its reward is the success flag summed over the action repeat)
    mw = summarise("mw_reach", [{"goal": 0, "returns": [0.0, 1.0], "max_rewards": [0.0, 1.0]}], 0.0)
    assert mw["success"] == 0.5 and mw["goal_success_rates"] == {"0": 0.5}


def test_the_headline_is_the_mean_over_goals_of_each_goals_success_rate():
    # goal 0: 1 of 4 episodes; goal 1: 4 of 4 over two jobs; goal 2: 0 of 2. The mean of the per-goal
    # rates (1/4 + 1 + 0) / 3 differs from the fraction of episodes (5/10) and of goals found in any
    # episode (2/3), the second figure.
    jobs = [{"goal": 0, "returns": [0.0, 2.0, 0.0, 0.0], "max_rewards": [0.0, 1.0, 0.0, 0.0]},
            {"goal": 1, "returns": [1.0, 1.0], "max_rewards": [1.0, 1.0]},
            {"goal": 1, "returns": [3.0, 2.0], "max_rewards": [2.0, 1.0]},
            {"goal": 2, "returns": [0.0, 0.0], "max_rewards": [0.0, 0.0]}]
    summary = summarise("mw_reach", jobs, threshold=0.0)
    assert summary["success"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert summary["goal_success_rates"] == {"0": 0.25, "1": 1.0, "2": 0.0}
    assert summary["episodes"] == 10 and summary["episodes_found"] == 5 and summary["episode_success"] == 0.5
    assert summary["goals"] == 3 and summary["goals_found_any"] == 2
    assert summary["goal_any_success"] == pytest.approx(2 / 3) and summary["found_goals"] == [0, 1]
    line = summary_line(summary, "random actions")
    assert line.startswith("mw_reach, random actions: success 0.417 (mean over 3 goals of each goal's fraction "
                           "of episodes with a return > 0)")
    assert "2 of 3 goals found in any episode (0.667)" in line and "5 of 10 episodes" in line
    jaco = summarise("jaco_reach_top_left", [{"goal": None, "returns": [1.0, 0.0], "max_rewards": [1.0, 0.0]}], 1e-4)
    assert summary_line(jaco, "the skills of s.pt").startswith(
        "jaco_reach_top_left, the skills of s.pt: success 0.500 (1 of 2 episodes with a return > 0.0001)")


def test_meta_world_evaluation_draws_a_new_skill_every_50_steps():
    def every(presets, *overrides):
        return load_config(presets, list(overrides)).agent.choreographer.random_skill_every

    assert every(["metaworld"], "mode=evaluate") == 50  # the reference's Meta-World protocol
    assert every(["tiny", "metaworld"], "mode=evaluate") == 50
    assert every(["metaworld"], "mode=evaluate", "agent.choreographer.random_skill_every=7") == 7  # --skill-every
    assert every(["metaworld"]) == 125  # pretraining and fine-tuning keep theirs
    assert every([], "mode=evaluate", "env.task=jaco_reach_top_left") == 1_000_000_000  # one skill an episode


def test_jobs_split_by_goal_or_by_episodes():
    mw = load_config(["tiny"], ["suite=metaworld", "env.task=mw_reach"])
    jobs = plan_jobs(mw, 100, None)
    assert [c.env.goal_index for c, _ in jobs] == list(range(50)) and {n for _, n in jobs} == {100}
    assert [c.env.goal_index for c, _ in plan_jobs(mw, 3, [4, 7])] == [4, 7]
    jaco = load_config(["tiny"], ["env.task=jaco_reach_top_left"])
    sizes = [n for _, n in plan_jobs(jaco, 2 * JOB_EPISODES + 3, None)]
    assert sizes == [JOB_EPISODES, JOB_EPISODES, 3]


def test_a_local_evaluation_runs_its_jobs_here_with_one_progress_display(tmp_path, monkeypatch):
    """Random actions on walker_stand, 2 jobs of 1 and 1 episode (JOB_EPISODES = 1): the summary
    counts both, and the display (not a terminal) shows plain lines ending with every job done."""
    import io

    from choreo.launch.commands import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "JOB_EPISODES", 1)
    config = load_config(["tiny"], ["env.task=walker_stand", "mode=evaluate"])
    stream = io.StringIO()
    summary = evaluate_module.evaluate(config, tmp_path, 2, "random", local=True, stream=stream)
    assert summary["episodes"] == 2 and summary["policy"] == "random"
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("choreo evaluate: 0/2 jobs  0/2 episodes")
    assert lines[-1].startswith("choreo evaluate: 2/2 jobs  2/2 episodes")
    assert "\r" not in stream.getvalue()
