"""The environment worker: steps a batch of environments with one batched policy call per step and
cuts each environment's stream of steps into fixed-length chunks for the replay.

Row layout (see choreo/vocabulary.py): row t holds observation[t] and the decision that LED TO it:
action[t], the skill held when choosing it and the version of the weights that chose it. A reset
row has action zeros, reward 0, discount 1, is_first True, skill -1 and policy_version -1 (no
weights chose its action). An episode of E agent steps therefore gives E + 1 rows, the last with
is_last (and is_terminal only when the environment terminated; truncation keeps discount 1).

Streams: environment i of runner r writes the stream `r * len(envs) + i`. Every runner of a run
has the same number of environments (`envs_per_actor`), so stream ids are unique and dense over
the run; the replay routes a stream to one shard. A stream is continuous: its chunks follow each
other, episodes run across chunk boundaries, and a new episode starts on the row after the
previous episode's last row.

Random seed phase: during the first `random_steps` calls of `step()` every environment takes
uniform random actions in [-1, 1] (stamped policy_version -1, skill -1) and the policy is not
called at all. Its recurrent state therefore does not follow those steps, so the first policy call
after the phase starts from `policy.initial_state(N)` with `is_first` set for every environment:
the policy treats the current (mid-episode) observation as the start of its filter. Only the
policy's input is forced; the rows keep the environments' true flags.

Seeding: environment i of runner r is built and first reset with
`derive_seed(seed, "runner", r, "env", i)`; later resets pass no seed, so episodes continue the
environment's own random stream (deterministic given the first seed). The random seed actions
come from a numpy Generator seeded with `derive_seed(seed, "runner", r, "random_actions")`.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium
import numpy as np

from choreo import vocabulary as B
from choreo.vocabulary import derive_seed

Chunk = dict[str, np.ndarray]


def env_seed(seed: int, runner_id: int, env_index: int) -> int:
    """Seed of the first reset of environment `env_index` of runner `runner_id`."""
    return derive_seed(seed, "runner", runner_id, "env", env_index)


class EnvRunner:
    """Steps `envs` with `policy`; see the module docstring for the row layout, streams and seeding.

    policy: `initial_state(n)`, `act(observation [N, ...], is_first [N], state, mode) -> (action
        [N, A], state, {"skill": [N], ...})`, `load_weights(arrays, version)`, `.version`, and
        optionally `step_keys` ({key: (trailing shape, dtype)}: extras of `act` stored with each
        row, e.g. DADS's skill vector and behaviour log-probability). The arrays passed to `act`
        are the runner's own buffers, valid only during the call.
    chunk_length: rows per chunk.
    random_steps: `step()` calls (= agent steps per environment) of uniform random actions
        before the policy acts.
    mode: passed to `policy.act` ("sample" for training, "mode" for evaluation).
    """

    def __init__(self, envs: list[gymnasium.Env], policy: Any, chunk_length: int, runner_id: int, seed: int,
                 random_steps: int = 0, mode: str = "sample") -> None:
        if not envs:
            raise ValueError("EnvRunner needs at least one environment")
        if chunk_length < 1:
            raise ValueError(f"chunk_length must be at least 1, got {chunk_length}")
        if random_steps < 0:
            raise ValueError(f"random_steps must be >= 0, got {random_steps}")
        self.envs = list(envs)
        self.policy = policy
        self.chunk_length = int(chunk_length)
        self.runner_id = int(runner_id)
        self.seed = int(seed)
        self.mode = mode
        n = len(self.envs)
        space = self.envs[0].observation_space
        self.obs_shape: tuple[int, ...] = tuple(space.shape)
        self.obs_dtype = np.dtype(np.uint8 if space.dtype == np.uint8 else np.float32)
        self.action_dim = int(np.prod(self.envs[0].action_space.shape))
        for env in self.envs[1:]:
            if tuple(env.observation_space.shape) != self.obs_shape or \
                    int(np.prod(env.action_space.shape)) != self.action_dim:
                raise ValueError("all environments of a runner must have the same observation and action spaces")
        self.action_repeat = int(getattr(self.envs[0].unwrapped, "action_repeat", 1))
        self.stream_ids = [self.runner_id * n + i for i in range(n)]
        self._rng = np.random.default_rng(derive_seed(self.seed, "runner", self.runner_id, "random_actions"))
        self._random_left = int(random_steps)

        # Chunk buffers [N, L, ...], one row position per environment.
        length = self.chunk_length
        self._obs_buf = np.zeros((n, length, *self.obs_shape), self.obs_dtype)
        self._act_buf = np.zeros((n, length, self.action_dim), np.float32)
        self._rew_buf = np.zeros((n, length), np.float32)
        self._disc_buf = np.ones((n, length), np.float32)
        self._first_buf = np.zeros((n, length), bool)
        self._last_buf = np.zeros((n, length), bool)
        self._term_buf = np.zeros((n, length), bool)
        self._skill_buf = np.full((n, length), -1, np.int32)
        self._ver_buf = np.full((n, length), -1, np.int64)
        # Keys some algorithms store with each step (DADS: the skill vector and the behaviour
        # log-probability), declared by the policy as {key: (trailing shape, dtype)}; zeros on
        # reset rows and random seed steps, which no skill chose.
        self._extra_bufs = {key: np.zeros((n, length, *shape), dtype)
                            for key, (shape, dtype) in getattr(policy, "step_keys", {}).items()}
        self._pos = np.zeros(n, np.int64)
        self._aligned = True  # all environments at the same row position
        self._env_index = np.arange(n)
        self._step_reward = np.zeros(n, np.float32)
        self._step_discount = np.ones(n, np.float32)
        self._step_last = np.zeros(n, bool)
        self._step_terminal = np.zeros(n, bool)

        # What the policy sees next: the latest observation of every env and whether it is a reset.
        self._obs = np.zeros((n, *self.obs_shape), self.obs_dtype)
        self._is_first = np.ones(n, bool)
        self._state = policy.initial_state(n)
        self._fresh_policy_state = False
        self._zero_action = np.zeros(self.action_dim, np.float32)

        self._ep_return = [0.0] * n
        self._ep_length = [0] * n
        self._finished: list[tuple[float, int]] = []
        # Navigation tasks report the x-y position (`info["xy"]`): how far each episode moved.
        self._start_xy: list[np.ndarray | None] = [None] * n
        self._displacements: list[np.ndarray] = []
        self._agent_steps = 0
        self._episodes = 0
        self._stats_steps = 0
        self._stats_time = time.perf_counter()

        self._pending: list[tuple[int, Chunk]] = []
        for i, env in enumerate(self.envs):
            obs, info = env.reset(seed=env_seed(self.seed, self.runner_id, i))
            self._start_xy[i] = info.get("xy")
            self._begin_episode(i, obs)  # with chunk_length 1 these rows come out of the first step()

    # ------------------------------------------------------------------ rows and chunks

    def _write(self, i: int, obs: np.ndarray, action: np.ndarray, reward: float, discount: float,
               first: bool, last: bool, terminal: bool, skill: int, version: int) -> None:
        """One row of environment i (used for reset rows; agent steps are written for all envs at once)."""
        t = int(self._pos[i])
        self._obs_buf[i, t] = obs
        self._act_buf[i, t] = action
        self._rew_buf[i, t] = reward
        self._disc_buf[i, t] = discount
        self._first_buf[i, t] = first
        self._last_buf[i, t] = last
        self._term_buf[i, t] = terminal
        self._skill_buf[i, t] = skill
        self._ver_buf[i, t] = version
        for buf in self._extra_bufs.values():
            buf[i, t] = 0
        t += 1
        if t == self.chunk_length:
            self._pending.append((self.stream_ids[i], self._chunk(i)))
            t = 0
        self._pos[i] = t

    def _write_step_rows(self, actions: np.ndarray, skills: np.ndarray | int, version: int,
                         extras: dict[str, np.ndarray] | None = None) -> None:
        """The agent-step rows of all environments: observations from `self._obs`, rewards and
        flags from the step arrays. While every environment is at the same row position (always,
        when episodes have equal lengths) this is one slice assignment per key."""
        if self._aligned:
            t = int(self._pos[0])
            rows = (slice(None), t)
        else:
            rows = (self._env_index, self._pos)
        self._obs_buf[rows] = self._obs
        self._act_buf[rows] = actions
        self._rew_buf[rows] = self._step_reward
        np.logical_not(self._step_terminal, out=self._step_discount)
        self._disc_buf[rows] = self._step_discount
        self._first_buf[rows] = False
        self._last_buf[rows] = self._step_last
        self._term_buf[rows] = self._step_terminal
        self._skill_buf[rows] = skills
        self._ver_buf[rows] = version
        for key, buf in self._extra_bufs.items():
            buf[rows] = extras[key] if extras is not None else 0
        self._pos += 1
        if self._aligned:
            if t + 1 == self.chunk_length:
                for i in range(len(self.envs)):
                    self._pending.append((self.stream_ids[i], self._chunk(i)))
                self._pos[:] = 0
        else:
            for i in np.flatnonzero(self._pos == self.chunk_length):
                self._pending.append((self.stream_ids[i], self._chunk(int(i))))
                self._pos[i] = 0

    def _chunk(self, i: int) -> Chunk:
        return {
            B.OBSERVATION: self._obs_buf[i].copy(),
            B.ACTION: self._act_buf[i].copy(),
            B.REWARD: self._rew_buf[i].copy(),
            B.DISCOUNT: self._disc_buf[i].copy(),
            B.IS_FIRST: self._first_buf[i].copy(),
            B.IS_LAST: self._last_buf[i].copy(),
            B.IS_TERMINAL: self._term_buf[i].copy(),
            B.SKILL: self._skill_buf[i].copy(),
            B.POLICY_VERSION: self._ver_buf[i].copy(),
            **{key: buf[i].copy() for key, buf in self._extra_bufs.items()},
        }

    def _begin_episode(self, i: int, obs: np.ndarray) -> None:
        self._write(i, obs, self._zero_action, 0.0, 1.0, True, False, False, -1, -1)
        self._obs[i] = obs
        self._is_first[i] = True
        self._ep_return[i] = 0.0
        self._ep_length[i] = 0

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[tuple[int, Chunk]]:
        """One agent step of every environment; returns the `(stream_id, chunk)` pairs completed
        (by this step, or by the first reset rows on the first call)."""
        n = len(self.envs)
        if self._random_left > 0:
            actions = self._rng.uniform(-1.0, 1.0, (n, self.action_dim)).astype(np.float32)
            skills: np.ndarray | int = -1
            version = -1
            extras = None
            self._random_left -= 1
            if self._random_left == 0:
                self._fresh_policy_state = True
        else:
            if self._fresh_policy_state:
                self._state = self.policy.initial_state(n)
                self._is_first[:] = True
                self._fresh_policy_state = False
            actions, self._state, extras = self.policy.act(self._obs, self._is_first, self._state, self.mode)
            actions = np.asarray(actions, np.float32).reshape(n, self.action_dim)
            skills = extras["skill"] if extras and "skill" in extras else -1
            version = int(self.policy.version)

        done: list[int] = []
        reward_out, last_out, term_out = self._step_reward, self._step_last, self._step_terminal
        for i, env in enumerate(self.envs):
            obs, reward, terminated, truncated, info = env.step(actions[i])
            self._obs[i] = obs
            reward = float(reward)
            reward_out[i] = reward
            term_out[i] = terminated
            last_out[i] = terminated or truncated
            self._ep_return[i] += reward
            self._ep_length[i] += 1
            if terminated or truncated:
                done.append(i)
                if self._start_xy[i] is not None and "xy" in info:
                    self._displacements.append(np.asarray(info["xy"], np.float64) - self._start_xy[i])
        self._write_step_rows(actions, skills, version, extras)
        self._is_first[:] = False
        for i in done:
            self._finished.append((self._ep_return[i], self._ep_length[i]))
            self._episodes += 1
            obs, info = self.envs[i].reset()
            self._start_xy[i] = info.get("xy")
            self._begin_episode(i, obs)
        if done and len(done) < n:
            self._aligned = bool(np.all(self._pos == self._pos[0]))
        self._agent_steps += n
        out, self._pending = self._pending, []
        return out

    def run(self, steps: int) -> list[tuple[int, Chunk]]:
        """`steps` calls of `step()`; the chunks completed on the way, in order."""
        out: list[tuple[int, Chunk]] = []
        for _ in range(steps):
            out.extend(self.step())
        return out

    def evaluate(self, episodes: int, positions: bool = False) -> dict[str, list]:
        """`episodes` fresh episodes acted by the policy (in this runner's mode), for evaluation:
        {"returns": each episode's return, "max_rewards": its largest step reward (a sparse reward
        was found when it reaches the threshold)}, in episode order; with `positions` (navigation
        tasks) also "xy": each episode's x-y positions [T + 1, 2] from its reset on, and "goals":
        its goal, from the environments' `info["xy"]` and `info["goal"]`. Nothing is written to chunks
        and the training streams are not touched (an evaluation runner does nothing else).
        Environment i plays episodes i, i + N, ...; each episode starts with a reset that continues
        the environment's own random stream."""
        if episodes < 1:
            raise ValueError(f"episodes must be at least 1, got {episodes}")
        n = len(self.envs)
        quota = [len(range(i, episodes, n)) for i in range(n)]  # episodes each env plays
        returns: list[list[float]] = [[] for _ in range(n)]
        peaks: list[list[float]] = [[] for _ in range(n)]
        paths: list[list[list]] = [[] for _ in range(n)]  # finished episodes' positions, per env
        goals: list[list] = [[] for _ in range(n)]
        resets = [env.reset() for env in self.envs]
        obs = np.stack([o for o, _ in resets]).astype(self.obs_dtype)
        path = [[info.get("xy")] for _, info in resets]  # the running episode's positions
        goal = [info.get("goal") for _, info in resets]
        first = np.ones(n, bool)
        running = np.array([q > 0 for q in quota])
        total = np.zeros(n)
        peak = np.full(n, -np.inf)
        state = self.policy.initial_state(n)
        while running.any():
            actions, state, _ = self.policy.act(obs, first, state, self.mode)
            actions = np.asarray(actions, np.float32).reshape(n, self.action_dim)
            first[:] = False
            for i in np.flatnonzero(running):
                obs[i], reward, terminated, truncated, info = self.envs[i].step(actions[i])
                total[i] += float(reward)
                peak[i] = max(peak[i], float(reward))
                if positions:
                    path[i].append(info.get("xy"))
                if terminated or truncated:
                    returns[i].append(float(total[i]))
                    peaks[i].append(float(peak[i]))
                    paths[i].append(path[i])
                    goals[i].append(goal[i])
                    total[i], peak[i] = 0.0, -np.inf
                    if len(returns[i]) == quota[i]:
                        running[i] = False
                    else:
                        obs[i], info = self.envs[i].reset()
                        path[i], goal[i] = [info.get("xy")], info.get("goal")
                        first[i] = True
        order = [(i, k) for k in range(max(quota)) for i in range(n) if k < quota[i]]  # episode order
        out: dict[str, list] = {"returns": [returns[i][k] for i, k in order],
                                "max_rewards": [peaks[i][k] for i, k in order]}
        if positions:
            if any(p is None for i, k in order for p in paths[i][k]):
                task = getattr(self.envs[0].unwrapped, "task_id", "the task")
                raise ValueError(f"{task} reports no x-y position (info['xy']): positions are for navigation tasks")
            out["xy"] = [np.asarray(paths[i][k], np.float64).tolist() for i, k in order]
            out["goals"] = [np.asarray(goals[i][k], np.float64).tolist() for i, k in order]
        return out

    def skip_random_steps(self) -> None:
        """End the random seed phase now (e.g. when a run resumes after it)."""
        if self._random_left > 0:
            self._random_left = 0
            self._fresh_policy_state = True

    # ------------------------------------------------------------------ weights and stats

    def set_weights(self, arrays: dict[str, np.ndarray], version: int) -> None:
        """Load acting weights; rows chosen from the next `step()` on carry `version`."""
        self.policy.load_weights(arrays, version)

    @property
    def version(self) -> int:
        return int(self.policy.version)

    @property
    def random_steps_left(self) -> int:
        return self._random_left

    def stats(self) -> dict[str, Any]:
        """Counters since construction and rates since the last call; drains finished episodes.

        agent_steps and frames count all environments (frames = agent steps x action repeat);
        episodes is the list of `(return, length)` of episodes finished since the last call, and
        xy_displacements their x-y displacements from start to end (navigation tasks, which
        report `info["xy"]`; empty otherwise).
        """
        now = time.perf_counter()
        elapsed = max(now - self._stats_time, 1e-9)
        steps = self._agent_steps - self._stats_steps
        self._stats_time, self._stats_steps = now, self._agent_steps
        episodes, self._finished = self._finished, []
        displacements, self._displacements = self._displacements, []
        return {
            "runner_id": self.runner_id,
            "agent_steps": self._agent_steps,
            "frames": self._agent_steps * self.action_repeat,
            "num_episodes": self._episodes,
            "steps_per_second": steps / elapsed,
            "frames_per_second": steps * self.action_repeat / elapsed,
            "episodes": episodes,
            "xy_displacements": [d.tolist() for d in displacements],
            "version": self.version,
            "random_steps_left": self._random_left,
        }

    def close(self) -> None:
        for env in self.envs:
            env.close()
