"""The environment worker: steps a batch of environments with one batched policy call per step and
cuts each environment's stream of steps into fixed-length chunks for the replay. The stepping is
the one rollout's (`choreo.actors.rollout`): a `Stepper` carries the stream from one `step()` to the
next, and `evaluate` plays whole episodes with `rollout`.

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
from choreo.actors.rollout import Stepper, rollout
from choreo.vocabulary import derive_seed

Chunk = dict[str, np.ndarray]


def env_seed(seed: int, runner_id: int, env_index: int) -> int:
    """Seed of the first reset of environment `env_index` of runner `runner_id`."""
    return derive_seed(seed, "runner", runner_id, "env", env_index)


def skill_counts(skills: np.ndarray) -> dict[str, int]:
    """{skill index: steps} of one episode's per-step skills `[T]`; -1 (no skill) is left out.
    String keys: the form JSON gives them back in."""
    values, counts = np.unique(np.asarray(skills).reshape(-1), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts) if v >= 0}


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
        if chunk_length < 1:
            raise ValueError(f"chunk_length must be at least 1, got {chunk_length}")
        if random_steps < 0:
            raise ValueError(f"random_steps must be >= 0, got {random_steps}")
        if not envs:
            raise ValueError("EnvRunner needs at least one environment")
        # The stream's stepping: observations, is_first, the policy's state, the last step's rewards
        # and flags, the running episodes' returns; the rows below are written from its arrays.
        self._stepper = Stepper(envs, policy, mode)
        self.envs = self._stepper.envs
        self.policy = policy
        self.chunk_length = int(chunk_length)
        self.runner_id = int(runner_id)
        self.seed = int(seed)
        self.mode = mode
        n = len(self.envs)
        self.obs_shape: tuple[int, ...] = self._stepper.obs_shape
        self.obs_dtype = self._stepper.obs_dtype
        self.action_dim = self._stepper.action_dim
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
        self._step_discount = np.ones(n, np.float32)
        self._fresh_policy_state = False
        self._zero_action = np.zeros(self.action_dim, np.float32)

        self._finished: list[tuple[float, int]] = []
        # Navigation tasks report the x-y position (`info["xy"]`): how far each episode moved.
        self._start_xy: list[np.ndarray | None] = [None] * n
        self._displacements: list[np.ndarray] = []
        self._agent_steps = 0
        self._episodes = 0
        self._stats_steps = 0
        self._stats_time = time.perf_counter()

        self._pending: list[tuple[int, Chunk]] = []
        self._stepper.reset([env_seed(self.seed, self.runner_id, i) for i in range(n)])
        for i in range(n):
            self._start_xy[i] = self._stepper.infos[i].get("xy")
            self._begin_episode(i)  # with chunk_length 1 these rows come out of the first step()

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
        """The agent-step rows of all environments: observations, rewards and flags from the
        stepper's arrays. While every environment is at the same row position (always, when
        episodes have equal lengths) this is one slice assignment per key."""
        if self._aligned:
            t = int(self._pos[0])
            rows = (slice(None), t)
        else:
            rows = (self._env_index, self._pos)
        stepper = self._stepper
        self._obs_buf[rows] = stepper.observation
        self._act_buf[rows] = actions
        self._rew_buf[rows] = stepper.reward
        np.logical_not(stepper.terminal, out=self._step_discount)
        self._disc_buf[rows] = self._step_discount
        self._first_buf[rows] = False
        self._last_buf[rows] = stepper.last
        self._term_buf[rows] = stepper.terminal
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

    def _begin_episode(self, i: int) -> None:
        """The reset row of environment i, whose stepper has just restarted it."""
        self._write(i, self._stepper.observation[i], self._zero_action, 0.0, 1.0, True, False, False, -1, -1)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[tuple[int, Chunk]]:
        """One agent step of every environment; returns the `(stream_id, chunk)` pairs completed
        (by this step, or by the first reset rows on the first call)."""
        n = len(self.envs)
        stepper = self._stepper
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
                stepper.fresh_state()
                self._fresh_policy_state = False
            actions, extras = stepper.act()
            skills = extras["skill"] if extras and "skill" in extras else -1
            version = int(self.policy.version)

        done = stepper.step(actions)
        self._write_step_rows(actions, skills, version, extras)
        for i in done:
            info = stepper.infos[i]
            if self._start_xy[i] is not None and "xy" in info:
                self._displacements.append(np.asarray(info["xy"], np.float64) - self._start_xy[i])
            self._finished.append((stepper.episode_return[i], stepper.episode_length[i]))
            self._episodes += 1
            self._start_xy[i] = stepper.restart(i).get("xy")
            self._begin_episode(i)
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
        its goal, from the environments' `info["xy"]` and `info["goal"]`. A policy that chooses its
        own skills (behaviour "meta") also gives "skill_counts": per episode, {skill index (as a
        string): agent steps it conditioned}, when any step had one. Nothing is written to chunks
        and the training streams are not touched (an evaluation runner does nothing else).
        Environment i plays episodes i, i + N, ...; each episode starts with a reset that continues
        the environment's own random stream."""
        if episodes < 1:
            raise ValueError(f"episodes must be at least 1, got {episodes}")
        picks = getattr(self.policy, "behaviour", None) == "meta"
        played = rollout(self.policy, self.envs, episodes=episodes, mode=self.mode,
                         record=(("xy", "goals") if positions else ()) + (("skill",) if picks else ()))
        out: dict[str, list] = {"returns": played["returns"], "max_rewards": played["max_rewards"]}
        if picks:
            counts = [skill_counts(skills) for skills in played["skill"]]
            if any(counts):
                out["skill_counts"] = counts
        if positions:
            if "xy" not in played:
                task = getattr(self.envs[0].unwrapped, "task_id", "the task")
                raise ValueError(f"{task} reports no x-y position (info['xy']): positions are for navigation tasks")
            out["xy"] = [xy.tolist() for xy in played["xy"]]
            out["goals"] = [np.asarray(goal, np.float64).tolist() for goal in played["goals"]]
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
