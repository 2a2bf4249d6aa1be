"""The one rollout (choreo.actors.rollout): steps and whole episodes, is_first resetting the policy's
state, what it records, and the Stepper the EnvRunner streams its replay rows from."""

from __future__ import annotations

import numpy as np
import pytest

from choreo.actors.rollout import Stepper, rollout


class Space:
    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = shape, dtype


class Line:
    """obs = [t, episode, tag]; reward = 10 * tag + t after step t; the episode ends after `length`
    steps. Reports its x-y position (t, tag) and a goal (tag, -tag) unless `xy` is False; renders a
    [2, 2, 3] image filled with t."""

    observation_space, action_space = Space((3,)), Space((1,))

    def __init__(self, length: int, tag: float = 0.0, xy: bool = True) -> None:
        self.length, self.tag, self.xy = length, tag, xy
        self.t, self.episode = 0, -1
        self.resets: list[int | None] = []
        self.actions: list[float] = []

    def _info(self) -> dict:
        return {"xy": np.array([self.t, self.tag]), "goal": np.array([self.tag, -self.tag])} if self.xy else {}

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode, self.tag], np.float32)

    def reset(self, seed=None):
        self.resets.append(seed)
        self.t = 0
        self.episode += 1
        return self._obs(), self._info()

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        return self._obs(), 10.0 * self.tag + self.t, False, self.t >= self.length, self._info()

    def render(self):
        return np.full((2, 2, 3), self.t, np.uint8)


class Counting:
    """Acts with the steps since its state was reset (is_first), per environment; extras carry them
    as "skill" and a made-up "deter"; records every call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def initial_state(self, n: int) -> np.ndarray:
        return np.full(n, -100)

    def act(self, observation, is_first, state, mode="sample"):
        self.calls.append({"is_first": np.array(is_first), "obs": np.array(observation), "mode": mode})
        state = np.where(is_first, 0, state + 1)
        return state[:, None].astype(np.float32), state, {"skill": state.astype(np.int32), "deter": state * 2.0}


def test_steps_restart_episodes_and_is_first_resets_the_policy_state():
    envs = [Line(3), Line(2, tag=1)]
    policy = Counting()
    out = rollout(policy, envs, 5, seeds=[7, 8], record=("observations", "actions", "rewards", "is_first", "skill"))
    assert envs[0].resets == [7, None] and envs[1].resets == [8, None, None]  # seeded first, restarted unseeded
    assert out["observations"].shape == (2, 6, 3) and out["actions"].shape == (2, 5, 1)
    np.testing.assert_array_equal(out["observations"][0, :, 0], [0, 1, 2, 0, 1, 2])  # restarted after step 3
    np.testing.assert_array_equal(out["is_first"][1], [True, False, True, False, True, False])
    # The action is the steps since is_first: the policy state restarts with every episode.
    np.testing.assert_array_equal(out["actions"][0, :, 0], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(out["actions"][1, :, 0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(out["skill"], out["actions"][..., 0])
    np.testing.assert_array_equal(out["rewards"][1], [11, 12, 11, 12, 11])
    assert policy.calls[0]["is_first"].all() and len(policy.calls) == 5  # the last observation is not acted on


def test_steps_record_the_new_episodes_first_observation_not_the_old_ones_last():
    out = rollout(Counting(), [Line(2)], 3, record=("observations", "is_first"))
    np.testing.assert_array_equal(out["observations"][0, :, :2], [[0, 0], [1, 0], [0, 1], [1, 1]])
    np.testing.assert_array_equal(out["is_first"][0], [True, False, True, False])


def test_episodes_come_back_in_episode_order_with_their_records():
    """Three environments, five episodes of lengths 1, 2, 3 by environment: environment i plays
    episodes i and i + 3; each episode's records run from its reset to its last observation."""
    envs = [Line(1 + i, tag=i) for i in range(3)]
    policy = Counting()
    out = rollout(policy, envs, episodes=5, mode="sample",
                  record=("observations", "actions", "rewards", "xy", "goals", "frames", "skill"))
    lengths = [1, 2, 3, 1, 2]
    assert out["lengths"] == lengths
    tags = [0, 1, 2, 0, 1]
    assert out["returns"] == [sum(10.0 * g + t for t in range(1, n + 1)) for g, n in zip(tags, lengths)]
    assert out["max_rewards"] == [10.0 * g + n for g, n in zip(tags, lengths)]
    for e, (g, n) in enumerate(zip(tags, lengths)):
        np.testing.assert_array_equal(out["observations"][e][:, 0], np.arange(n + 1))
        assert (out["observations"][e][:, 1] == e // 3).all()  # the environment's first or second episode
        np.testing.assert_array_equal(out["xy"][e], np.stack([np.arange(n + 1), np.full(n + 1, g)], 1))
        np.testing.assert_array_equal(out["goals"][e], [g, -g])
        np.testing.assert_array_equal(out["frames"][e][:, 0, 0, 0], np.arange(n + 1))
        assert out["actions"][e].shape == (n, 1) and out["rewards"][e].shape == (n,)
        np.testing.assert_array_equal(out["skill"][e], np.arange(n))  # policy state reset at each episode
    assert len(envs[2].resets) == 1  # a third episode is not started: environment 2 has played its one
    assert {c["mode"] for c in policy.calls} == {"sample"}


def test_an_environment_that_played_its_episodes_is_not_stepped_again():
    envs = [Line(1), Line(4)]
    rollout(Counting(), envs, episodes=2, record=())
    assert len(envs[0].actions) == 1 and len(envs[1].actions) == 4


def test_xy_is_left_out_when_an_environment_does_not_report_it():
    out = rollout(Counting(), [Line(2), Line(2, xy=False)], 3, record=("xy", "rewards"))
    assert "xy" not in out and out["rewards"].shape == (2, 3)
    assert "xy" not in rollout(Counting(), [Line(2, xy=False)], episodes=1, record=("xy",))


def test_on_act_sees_the_state_of_every_observation():
    seen = []
    rollout(Counting(), [Line(5)], 3, record=(), on_act=lambda t, obs, state: seen.append((t, obs[0, 0], state[0])))
    assert seen == [(0, 0.0, 0), (1, 1.0, 1), (2, 2.0, 2), (3, 3.0, 3)]


def test_the_given_state_is_the_policy_state_of_the_first_step():
    out = rollout(Counting(), [Line(9), Line(9)], 2, state=np.array([5, 6]), record=("actions",))
    # is_first is set at the start, so the policy resets its own state: the given state is handed to act.
    np.testing.assert_array_equal(out["actions"][:, :, 0], [[0, 1], [0, 1]])
    calls = []

    class Keeps(Counting):
        def act(self, observation, is_first, state, mode="sample"):
            calls.append(np.array(state))
            return np.zeros((len(observation), 1), np.float32), state, {}

    rollout(Keeps(), [Line(9), Line(9)], 1, state=np.array([5, 6]), record=())
    np.testing.assert_array_equal(calls[0], [5, 6])


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="steps or episodes"):
        rollout(Counting(), [Line(2)], 2, episodes=2)
    with pytest.raises(ValueError, match="steps or episodes"):
        rollout(Counting(), [Line(2)])
    with pytest.raises(ValueError, match="at least 1"):
        rollout(Counting(), [Line(2)], 0)
    with pytest.raises(ValueError, match="per episode"):
        rollout(Counting(), [Line(2)], 2, record=("goals",))
    with pytest.raises(ValueError, match="'nonsense'.*extras hold \\['deter', 'skill'\\]"):
        rollout(Counting(), [Line(2)], 2, record=("nonsense",))
    with pytest.raises(ValueError, match="at least one environment"):
        Stepper([], Counting())


def test_stepper_keeps_the_last_observation_until_restart_and_tracks_the_episode():
    stepper = Stepper([Line(2, tag=1), Line(3)], Counting(), mode="mode")
    stepper.reset([1, 2])
    assert stepper.is_first.all() and stepper.state.tolist() == [-100, -100]
    for _ in range(2):
        actions, extras = stepper.act()
        done = stepper.step(actions)
    assert done == [0] and not stepper.is_first.any()
    np.testing.assert_array_equal(stepper.observation[0], [2, 0, 1])  # the episode's last observation
    assert stepper.last.tolist() == [True, False] and stepper.terminal.tolist() == [False, False]
    assert stepper.episode_return[0] == 23.0 and stepper.episode_length[0] == 2 and stepper.episode_peak[0] == 12.0
    stepper.restart(0)
    assert stepper.is_first.tolist() == [True, False] and stepper.episode_return[0] == 0.0
    np.testing.assert_array_equal(stepper.observation[0], [0, 1, 1])
    actions, _ = stepper.act()
    np.testing.assert_array_equal(actions[:, 0], [0, 2])  # environment 0's state restarted, 1's went on
    stepper.step(actions, active=np.array([False, True]))
    assert stepper.episode_length == [0, 3]
