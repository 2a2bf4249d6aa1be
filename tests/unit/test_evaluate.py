"""Zero-shot evaluation: jobs are planned per goal (Meta-World) or in slices of episodes, and a
scripted policy that reaches the sparse reward in known episodes is counted exactly."""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces

from choreo.actors.runner import EnvRunner
from choreo.launch.runtime.config import load_config
from choreo.launch.commands.evaluate import JOB_EPISODES, plan_jobs, summarise


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


def test_goals_are_found_in_any_of_their_episodes():
    jobs = [{"goal": 0, "returns": [0, 0], "max_rewards": [0.0, 0.0]},
            {"goal": 1, "returns": [0, 2], "max_rewards": [0.0, 1.0]},
            {"goal": 2, "returns": [1, 1], "max_rewards": [1.0, 1.0]},
            {"goal": 3, "returns": [0, 0], "max_rewards": [5e-5, 0.0]}]  # under the threshold
    summary = summarise("mw_reach", jobs, threshold=1e-4)
    assert summary["goals"] == 4 and summary["goals_found"] == 2 and summary["goal_success"] == 0.5
    assert summary["found_goals"] == [1, 2] and summary["episodes_found"] == 3


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
