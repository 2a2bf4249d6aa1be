"""EnvRunner: row layout, chunking, batching, version stamping, the random seed phase, seeding and
stats, with a deterministic fake environment and a recording fake policy; one run with a real
environment and the real Choreographer policy."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

from choreo.actors.runner import EnvRunner, env_seed
from choreo.launch.runtime.build import make_runner, random_steps_per_env
from choreo.vocabulary import derive_seed
from choreo import vocabulary as B

ACTION_DIM = 2
POLICY_ACTION = 0.5


class CounterEnv(gymnasium.Env):
    """obs = [t, episode, env tag]: t the agent step within the episode (0 at reset); reward = t
    after the step; the episode ends after `length` steps (truncated, or terminated)."""

    def __init__(self, length: int = 3, terminate: bool = False, tag: float = 0.0, action_repeat: int = 2):
        self.length = length
        self.terminate = terminate
        self.tag = tag
        self.action_repeat = action_repeat
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.t = 0
        self.episode = -1
        self.reset_seeds: list[int | None] = []
        self.actions: list[np.ndarray] = []

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode, self.tag], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.reset_seeds.append(seed)
        self.t = 0
        self.episode += 1
        return self._obs(), {}

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        self.t += 1
        end = self.t >= self.length
        return self._obs(), float(self.t), end and self.terminate, end and not self.terminate, {}


class FakePolicy:
    """Returns constant actions and skill = 10 + env index; records every call."""

    def __init__(self) -> None:
        self.version = -1
        self.calls: list[dict] = []
        self.initial_states = 0
        self.loaded: list[tuple[dict, int]] = []

    def initial_state(self, n: int) -> dict:
        self.initial_states += 1
        return {"fresh": np.ones(n, bool), "steps": np.zeros(n, int)}

    def act(self, observation, is_first, state, mode="sample"):
        n = len(observation)
        self.calls.append({"obs": np.array(observation, copy=True), "is_first": np.array(is_first, copy=True),
                           "fresh": state["fresh"].copy(), "mode": mode})
        action = np.full((n, ACTION_DIM), POLICY_ACTION, np.float32)
        new_state = {"fresh": np.zeros(n, bool), "steps": state["steps"] + 1}
        return action, new_state, {"skill": (10 + np.arange(n)).astype(np.int32)}

    def load_weights(self, arrays, version):
        self.loaded.append((arrays, version))
        self.version = int(version)


def make(n: int = 1, length: int = 3, chunk: int = 4, random_steps: int = 0, runner_id: int = 0, seed: int = 7,
         terminate: bool = False, lengths: list[int] | None = None) -> tuple[EnvRunner, list[CounterEnv], FakePolicy]:
    lengths = lengths or [length] * n
    envs = [CounterEnv(lengths[i], terminate, tag=i) for i in range(n)]
    policy = FakePolicy()
    runner = EnvRunner(envs, policy, chunk, runner_id, seed, random_steps=random_steps)
    return runner, envs, policy


def collect(runner: EnvRunner, steps: int) -> dict[int, list[dict[str, np.ndarray]]]:
    by_stream: dict[int, list] = {}
    for stream, chunk in runner.run(steps):
        by_stream.setdefault(stream, []).append(chunk)
    return by_stream


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in B.KEYS}


def expected_t(length: int, rows: int) -> np.ndarray:
    """Step-within-episode of each row of a stream: 0, 1, ..., length, 0, 1, ..."""
    return np.arange(rows) % (length + 1)


# ---------------------------------------------------------------------------- layout


def test_row_layout_of_a_stream():
    length, chunk = 3, 4
    runner, envs, policy = make(length=length, chunk=chunk)
    policy.version = 5
    rows = concat(collect(runner, 3 * length)[0])  # 3 episodes -> 3 * (E + 1) = 12 rows = 3 chunks
    assert len(rows[B.REWARD]) == 3 * (length + 1)
    t = expected_t(length, len(rows[B.REWARD]))
    np.testing.assert_array_equal(rows[B.OBSERVATION][:, 0], t)
    np.testing.assert_array_equal(rows[B.OBSERVATION][:, 1], np.repeat(np.arange(3), length + 1))
    reset = t == 0
    np.testing.assert_array_equal(rows[B.IS_FIRST], reset)
    np.testing.assert_array_equal(rows[B.IS_LAST], t == length)
    assert not rows[B.IS_TERMINAL].any()  # truncation is not termination
    np.testing.assert_array_equal(rows[B.DISCOUNT], np.ones(len(t)))
    np.testing.assert_array_equal(rows[B.REWARD], t.astype(np.float32))  # the reward that came with obs t
    # action[t] led to observation[t]: zeros on reset rows, the policy's action otherwise, and
    # exactly the action the environment received before emitting that observation.
    np.testing.assert_array_equal(rows[B.ACTION][reset], 0.0)
    np.testing.assert_array_equal(rows[B.ACTION][~reset], POLICY_ACTION)
    np.testing.assert_array_equal(rows[B.ACTION][~reset], np.stack(envs[0].actions))
    np.testing.assert_array_equal(rows[B.SKILL], np.where(reset, -1, 10))
    np.testing.assert_array_equal(rows[B.POLICY_VERSION], np.where(reset, -1, 5))


def test_dtypes_and_shapes():
    runner, _, _ = make(n=2, chunk=5)
    chunks = runner.run(10)
    assert chunks
    dtypes = {B.OBSERVATION: np.float32, B.ACTION: np.float32, B.REWARD: np.float32, B.DISCOUNT: np.float32,
              B.IS_FIRST: np.bool_, B.IS_LAST: np.bool_, B.IS_TERMINAL: np.bool_, B.SKILL: np.int32,
              B.POLICY_VERSION: np.int64}
    for _, chunk in chunks:
        assert set(chunk) == set(B.KEYS)
        for key, dtype in dtypes.items():
            assert chunk[key].dtype == dtype, key
            assert chunk[key].shape[0] == 5
        assert chunk[B.OBSERVATION].shape == (5, 3)
        assert chunk[B.ACTION].shape == (5, ACTION_DIM)


def test_termination_sets_is_terminal_and_discount_zero():
    runner, _, _ = make(length=2, chunk=3, terminate=True)
    rows = concat(collect(runner, 4)[0])
    t = expected_t(2, len(rows[B.REWARD]))
    np.testing.assert_array_equal(rows[B.IS_TERMINAL], t == 2)
    np.testing.assert_array_equal(rows[B.IS_LAST], t == 2)
    np.testing.assert_array_equal(rows[B.DISCOUNT], np.where(t == 2, 0.0, 1.0))


@pytest.mark.parametrize("chunk", [1, 3, 5, 7])
def test_chunks_have_fixed_length_and_continue_across_episodes(chunk):
    length, steps = 3, 20
    runner, _, _ = make(length=length, chunk=chunk)
    chunks = collect(runner, steps)[0]
    assert all(len(c[B.REWARD]) == chunk for c in chunks)
    rows = concat(chunks)
    total = steps + steps // length + 1  # agent-step rows + reset rows (the first one included)
    assert len(rows[B.REWARD]) == total // chunk * chunk  # nothing lost, the remainder still buffered
    np.testing.assert_array_equal(rows[B.OBSERVATION][:, 0], expected_t(length, len(rows[B.REWARD])))


def test_chunks_are_copies():
    runner, _, _ = make(length=3, chunk=2)
    first = runner.run(2)
    snapshot = {k: v.copy() for k, v in first[0][1].items()}
    runner.run(10)
    for key in B.KEYS:
        np.testing.assert_array_equal(first[0][1][key], snapshot[key])


# ---------------------------------------------------------------------------- batching and streams


def test_one_batched_act_call_per_step_and_stream_ids():
    n = 3
    runner, _, policy = make(n=n, length=4, chunk=5, runner_id=2)
    by_stream = collect(runner, 12)
    assert len(policy.calls) == 12
    for call in policy.calls:
        assert call["obs"].shape == (n, 3)
        np.testing.assert_array_equal(call["obs"][:, 2], np.arange(n))  # env i's observation in row i
    assert runner.stream_ids == [6, 7, 8]  # runner_id * envs_per_runner + env_index
    assert sorted(by_stream) == [6, 7, 8]
    for i, stream in enumerate(runner.stream_ids):
        rows = concat(by_stream[stream])
        np.testing.assert_array_equal(rows[B.OBSERVATION][:, 2], i)  # routed by env
        np.testing.assert_array_equal(rows[B.SKILL][~rows[B.IS_FIRST]], 10 + i)


def test_streams_with_different_episode_lengths():
    lengths = [2, 3, 5]
    runner, _, _ = make(n=3, chunk=4, lengths=lengths)
    by_stream = collect(runner, 30)
    for i, length in enumerate(lengths):
        rows = concat(by_stream[i])
        t = expected_t(length, len(rows[B.REWARD]))
        assert len(rows[B.REWARD]) == (30 + 30 // length + 1) // 4 * 4
        np.testing.assert_array_equal(rows[B.OBSERVATION][:, 0], t)
        np.testing.assert_array_equal(rows[B.IS_FIRST], t == 0)
        np.testing.assert_array_equal(rows[B.IS_LAST], t == length)
        np.testing.assert_array_equal(rows[B.REWARD], t)
        np.testing.assert_array_equal(rows[B.ACTION][t == 0], 0.0)
        np.testing.assert_array_equal(rows[B.ACTION][t != 0], POLICY_ACTION)


def test_is_first_passed_to_the_policy_at_episode_starts():
    length = 3
    runner, _, policy = make(n=2, length=length, lengths=[3, 4])
    runner.run(12)
    for k, call in enumerate(policy.calls):
        # the observation seen at call k is a reset observation exactly when its t is 0
        np.testing.assert_array_equal(call["is_first"], call["obs"][:, 0] == 0)
        assert call["mode"] == "sample"
    assert policy.calls[0]["is_first"].all()
    assert policy.initial_states == 1


# ---------------------------------------------------------------------------- versions and weights


def test_set_weights_stamps_only_later_rows():
    runner, _, policy = make(length=100, chunk=1)
    runner.set_weights({"w": np.zeros(1)}, 3)
    early = [c for _, c in runner.run(4)]
    runner.set_weights({"w": np.ones(1)}, 4)
    assert runner.version == 4 and policy.loaded[-1][1] == 4
    late = [c for _, c in runner.run(3)]
    versions_early = [int(c[B.POLICY_VERSION][0]) for c in early]
    assert versions_early == [-1, 3, 3, 3, 3]  # the reset row, then 4 steps chosen by version 3
    assert [int(c[B.POLICY_VERSION][0]) for c in late] == [4, 4, 4]


def test_random_phase_then_policy():
    random_steps, length = 4, 3
    runner, envs, policy = make(n=2, length=length, chunk=1, random_steps=random_steps)
    policy.version = 9
    rows_by_stream = collect(runner, random_steps + 4)
    assert len(policy.calls) == 4  # never called during the random phase
    # The first call after the phase starts from a fresh state with is_first set everywhere,
    # although the environments are mid-episode (4 steps of 3-step episodes: t = 1 now).
    assert policy.initial_states == 2
    assert policy.calls[0]["is_first"].all() and policy.calls[0]["fresh"].all()
    np.testing.assert_array_equal(policy.calls[0]["obs"][:, 0], [1, 1])
    for call in policy.calls[1:]:  # afterwards only at true resets
        np.testing.assert_array_equal(call["is_first"], call["obs"][:, 0] == 0)
    for stream, chunks in rows_by_stream.items():
        rows = concat(chunks)
        steps = ~rows[B.IS_FIRST]
        version, skill, action = rows[B.POLICY_VERSION][steps], rows[B.SKILL][steps], rows[B.ACTION][steps]
        np.testing.assert_array_equal(version, [-1] * random_steps + [9] * 4)
        np.testing.assert_array_equal(skill[:random_steps], -1)
        assert np.all(np.abs(action[:random_steps]) <= 1.0)
        assert not np.allclose(action[:random_steps], POLICY_ACTION)
        np.testing.assert_array_equal(action[random_steps:], POLICY_ACTION)
        # the rows keep the environments' true flags
        t = rows[B.OBSERVATION][:, 0]
        np.testing.assert_array_equal(rows[B.IS_FIRST], t == 0)


def test_random_actions_reproducible_and_distinct():
    def actions(seed, runner_id):
        runner, envs, _ = make(n=2, random_steps=20, seed=seed, runner_id=runner_id)
        runner.run(20)
        return np.stack([np.stack(e.actions) for e in envs])

    a = actions(1, 0)
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.dtype == np.float32
    assert a.std() > 0.3  # uniform on [-1, 1]: std 0.577
    np.testing.assert_array_equal(a, actions(1, 0))
    assert not np.allclose(a, actions(2, 0))
    assert not np.allclose(a, actions(1, 1))
    assert not np.allclose(a[0], a[1])  # envs of a runner differ


def test_skip_random_steps():
    runner, _, policy = make(random_steps=50)
    runner.run(2)
    runner.skip_random_steps()
    assert runner.random_steps_left == 0
    runner.run(1)
    assert len(policy.calls) == 1 and policy.calls[0]["is_first"].all() and policy.calls[0]["fresh"].all()


# ---------------------------------------------------------------------------- seeding and stats


def test_env_seeding_first_reset_only():
    runner, envs, _ = make(n=2, length=2, runner_id=3, seed=11)
    runner.run(5)
    for i, env in enumerate(envs):
        assert env.reset_seeds[0] == derive_seed(11, "runner", 3, "env", i) == env_seed(11, 3, i)
        assert len(env.reset_seeds) == 3 and env.reset_seeds[1:] == [None, None]


def test_stats_counts_and_drains_episodes():
    length = 4
    runner, _, _ = make(n=2, length=length)
    runner.run(9)
    stats = runner.stats()
    assert stats["agent_steps"] == 18
    assert stats["frames"] == 36  # action repeat 2
    assert stats["num_episodes"] == 4
    assert stats["episodes"] == [(10.0, 4)] * 4  # return 1 + 2 + 3 + 4
    assert stats["steps_per_second"] > 0
    again = runner.stats()
    assert again["episodes"] == [] and again["num_episodes"] == 4
    runner.run(3)
    assert runner.stats()["episodes"] == [(10.0, 4)] * 2


def test_random_steps_per_env():
    from choreo.launch.runtime.config import load_config

    config = load_config(["tiny"], ["learner.seed_frames=1000", "num_actors=3", "envs_per_actor=2",
                                    "env.action_repeat=2"])
    assert random_steps_per_env(config) == 84  # ceil(1000 / (2 * 3 * 2))
    assert random_steps_per_env(config, num_runners=1) == 250


# ---------------------------------------------------------------------------- real environment


def test_real_env_with_choreographer_policy():
    from choreo.launch.runtime.config import load_config

    config = load_config(["tiny"], ["env.task=walker_walk", "envs_per_actor=2", "num_actors=1",
                                    "learner.seed_frames=40", "replay.chunk_length=10"])
    runner = make_runner(config, runner_id=1, seed=0, freeze_gc=False)
    try:
        assert runner.random_steps_left == 20
        assert runner.obs_shape == (24,) and runner.action_dim == 6
        weights = {k: v.numpy() for k, v in runner.policy.state_dict().items()}
        runner.set_weights(weights, 2)
        chunks = runner.run(60)
        assert {s for s, _ in chunks} == {2, 3}
        assert len(chunks) == 2 * (61 // 10)
        for _, c in chunks:
            assert c[B.OBSERVATION].shape == (10, 24) and c[B.OBSERVATION].dtype == np.float32
            assert c[B.ACTION].shape == (10, 6) and c[B.ACTION].dtype == np.float32
            assert np.all(np.abs(c[B.ACTION]) <= 1.0) and np.isfinite(c[B.OBSERVATION]).all()
            assert c[B.POLICY_VERSION].dtype == np.int64 and c[B.SKILL].dtype == np.int32
        rows = concat([c for s, c in chunks if s == 2])
        assert rows[B.IS_FIRST][0] and not rows[B.IS_FIRST][1:].any()
        np.testing.assert_array_equal(rows[B.POLICY_VERSION][1:21], -1)
        np.testing.assert_array_equal(rows[B.POLICY_VERSION][21:], 2)
        assert runner.stats()["agent_steps"] == 120
    finally:
        runner.close()


def test_evaluate_plays_fresh_episodes_in_order_without_chunks():
    """Three envs, seven episodes: env i plays episodes i, i + 3, ...; episodes of unequal lengths
    (tags make them distinguishable) come back in episode order with their largest step reward."""
    envs = [CounterEnv(length=2 + i, tag=float(i)) for i in range(3)]
    policy = FakePolicy()
    runner = EnvRunner(envs, policy, chunk_length=4, runner_id=0, seed=1, mode="mode")
    out = runner.evaluate(7)
    lengths = [2, 3, 4, 2, 3, 4, 2]  # env of episode e is e % 3, its length 2 + env
    assert out["returns"] == [float(sum(range(1, n + 1))) for n in lengths]  # reward t after step t
    assert out["max_rewards"] == [float(n) for n in lengths]
    assert {call["mode"] for call in policy.calls} == {"mode"}
    assert policy.calls[0]["is_first"].all()
    stats = runner.stats()  # evaluation steps and episodes are not the training stream's
    assert stats["num_episodes"] == 0 and stats["agent_steps"] == 0
    with pytest.raises(ValueError, match="episodes"):
        runner.evaluate(0)


class MetaPolicy(FakePolicy):
    """Chooses its own skills: skill = (episode step) % 2 + 10 x env index, -1 at an episode's first step."""

    behaviour = "meta"

    def act(self, observation, is_first, state, mode="sample"):
        action, new_state, _ = super().act(observation, is_first, state, mode)
        t = np.asarray(observation)[:, 0].astype(np.int32)
        skill = np.where(t == 0, -1, t % 2 + 10 * np.arange(len(t)))
        return action, new_state, {"skill": skill.astype(np.int32)}


def test_evaluate_counts_the_skills_a_meta_policy_chose_in_each_episode():
    envs = [CounterEnv(length=4, tag=float(i)) for i in range(2)]
    out = EnvRunner(envs, MetaPolicy(), chunk_length=4, runner_id=0, seed=1, mode="mode").evaluate(3)
    # steps at t = 0, 1, 2, 3: no skill, then 1, 0, 1 (+ 10 in env 1); episode 2 is env 0's second
    assert out["skill_counts"] == [{"0": 1, "1": 2}, {"10": 1, "11": 2}, {"0": 1, "1": 2}]
    assert "skill_counts" not in EnvRunner([CounterEnv()], FakePolicy(), chunk_length=4, runner_id=0,
                                           seed=1).evaluate(1)


class StepKeysPolicy(FakePolicy):
    """Declares extras stored with every row: a skill vector [2] and a log-probability."""

    step_keys = {B.SKILL_VECTOR: ((2,), np.float32), B.BEHAVIOUR_LOGP: ((), np.float32)}

    def act(self, observation, is_first, state, mode="sample"):
        action, state, extras = super().act(observation, is_first, state, mode)
        n = len(observation)
        t = np.asarray(observation)[:, 0]  # the step the observation is at
        extras[B.SKILL_VECTOR] = np.stack([t + 0.5, -t], 1).astype(np.float32)
        extras[B.BEHAVIOUR_LOGP] = -(t + 1).astype(np.float32) - np.arange(n)
        return action, state, extras


@pytest.mark.parametrize("lengths", [[3, 3], [2, 3]], ids=["aligned", "unaligned"])
def test_extras_a_policy_declares_are_stored_with_each_row(lengths):
    envs = [CounterEnv(lengths[i], tag=i) for i in range(2)]
    runner = EnvRunner(envs, StepKeysPolicy(), 4, 0, 7, random_steps=2)
    by_stream: dict[int, list] = {}
    for stream, chunk in runner.run(12):
        assert chunk[B.SKILL_VECTOR].shape == (4, 2) and chunk[B.BEHAVIOUR_LOGP].shape == (4,)
        by_stream.setdefault(stream, []).append(chunk)
    for i, chunks in by_stream.items():
        rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        t = rows[B.OBSERVATION][:, 0]
        chosen = t > 0  # not a reset row
        chosen[:3] = False  # the first reset row and the two random seed steps: no skill chose them
        # Row t stores what the policy returned when it acted on observation t - 1.
        np.testing.assert_array_equal(rows[B.SKILL_VECTOR][chosen], np.stack([t[chosen] - 0.5, 1 - t[chosen]], 1))
        np.testing.assert_array_equal(rows[B.BEHAVIOUR_LOGP][chosen], -t[chosen] - i)
        np.testing.assert_array_equal(rows[B.SKILL_VECTOR][~chosen], 0.0)
        np.testing.assert_array_equal(rows[B.BEHAVIOUR_LOGP][~chosen], 0.0)
