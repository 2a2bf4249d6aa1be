"""One rollout: an acting policy stepping a batch of environments, for every caller that plays one
(the EnvRunner's replay stream and its evaluations, skill videos, the Python API's skill runs,
benchmarks).

Any acting policy drives it (exploration, skill, meta-controller, planner, uniform random): they
share `initial_state(n)` and `act(observation [N, ...], is_first [N], state, mode) -> (action
[N, A], state, extras)`. The arrays given to `act` are the stepper's own buffers, valid only
during the call.

`Stepper` holds what stepping needs from one step to the next: the observation each environment
shows next and whether it starts an episode (`is_first`, on which the policy resets that
environment's recurrent state), the policy's state, the last step's rewards and flags, and the
running episodes' returns, lengths and largest step rewards. A step is `act()` (one batched policy
call for all environments) then `step(actions)` (each environment once), then `restart(i)` for the
environments whose episode ended: between the two, `observation[i]` is the episode's last
observation. The EnvRunner streams its replay rows from these arrays one step per call; `rollout`
plays a whole call with them, a number of steps or of episodes, and records what it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

OBSERVATION_RECORDS = ("observations", "is_first", "xy", "frames")
"""What `rollout` can record at every observation: the observation, whether it starts an episode,
the environment's x-y position (`info["xy"]`, navigation tasks) and its rendering (`env.render()`)."""
STEP_RECORDS = ("actions", "rewards")
"""What `rollout` can record at every agent step, besides the extras the policy returns by name."""
EPISODE_RECORDS = ("goals",)
"""What `rollout` can record once per episode (episodes only): the goal its reset reported
(`info["goal"]`)."""


class Stepper:
    """The environments `envs` and the acting `policy` between steps (see the module docstring).

    mode: passed to `policy.act` ("sample" for training, "mode" for evaluation).
    The policy's state is made by `reset`, or set with `fresh_state`; until then it is None.
    """

    def __init__(self, envs: Sequence[Any], policy: Any, mode: str = "sample") -> None:
        if not envs:
            raise ValueError("stepping needs at least one environment")
        self.envs = list(envs)
        self.policy = policy
        self.mode = mode
        n = self.n = len(self.envs)
        space = self.envs[0].observation_space
        self.obs_shape: tuple[int, ...] = tuple(space.shape)
        self.obs_dtype = np.dtype(np.uint8 if getattr(space, "dtype", None) == np.uint8 else np.float32)
        self.action_dim = int(np.prod(self.envs[0].action_space.shape))
        for env in self.envs[1:]:
            if tuple(env.observation_space.shape) != self.obs_shape or \
                    int(np.prod(env.action_space.shape)) != self.action_dim:
                raise ValueError("all environments stepped together must have the same observation and action spaces")
        self.observation = np.zeros((n, *self.obs_shape), self.obs_dtype)
        """[N, ...]: what each environment shows next (after `step`, before `restart`: its last step's)."""
        self.is_first = np.ones(n, bool)
        """[N]: whether `observation[i]` starts an episode."""
        self.state: Any = None
        """The policy's recurrent state of all environments."""
        self.reward = np.zeros(n, np.float32)
        """[N]: the last step's rewards."""
        self.terminal = np.zeros(n, bool)
        """[N]: whether the last step terminated the episode (no value beyond it)."""
        self.last = np.zeros(n, bool)
        """[N]: whether the last step ended the episode (terminated or truncated)."""
        self.infos: list[dict] = [{} for _ in range(n)]
        """Each environment's info of its last step or reset."""
        self.episode_return = [0.0] * n
        self.episode_length = [0] * n
        self.episode_peak = [-np.inf] * n
        """Each running episode's largest step reward (a sparse reward is found when it reaches a threshold)."""
        self._all = range(n)

    def reset(self, seeds: Sequence[int | None] | None = None, state: Any = None) -> None:
        """A new episode in every environment (environment i reset with `seeds[i]`, default none:
        its own random stream goes on) and the policy's state anew (`state`, default
        `policy.initial_state(N)`)."""
        seeds = [None] * self.n if seeds is None else list(seeds)
        if len(seeds) != self.n:
            raise ValueError(f"{len(seeds)} seeds for {self.n} environments")
        for i, seed in enumerate(seeds):
            self.restart(i, seed)
        self.fresh_state(state)

    def fresh_state(self, state: Any = None) -> None:
        """The policy starts its filter anew on the current observations, as if each started an
        episode (the rows of a replay stream keep the environments' true flags)."""
        self.state = self.policy.initial_state(self.n) if state is None else state
        self.is_first[:] = True

    def restart(self, i: int, seed: int | None = None) -> dict:
        """The next episode of environment i: reset (with `seed`), its first observation in
        `observation[i]` with `is_first[i]` set; returns the reset's info."""
        obs, info = self.envs[i].reset(seed=seed)
        self.observation[i] = obs
        self.is_first[i] = True
        self.infos[i] = info
        self.episode_return[i] = 0.0
        self.episode_length[i] = 0
        self.episode_peak[i] = -np.inf
        return info

    def act(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One batched policy call on the current observations: (actions [N, A] float32, extras);
        the policy's state moves on."""
        actions, self.state, extras = self.policy.act(self.observation, self.is_first, self.state, self.mode)
        return np.asarray(actions, np.float32).reshape(self.n, self.action_dim), extras

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> list[int]:
        """Steps environment i with `actions[i]`, every one or those where `active [N]` is set;
        returns the indices whose episode ended (they await `restart`)."""
        done: list[int] = []
        envs, observation, rewards, terminal, last = self.envs, self.observation, self.reward, self.terminal, self.last
        infos, returns, lengths, peaks = self.infos, self.episode_return, self.episode_length, self.episode_peak
        for i in (self._all if active is None else np.flatnonzero(active).tolist()):
            obs, reward, terminated, truncated, info = envs[i].step(actions[i])
            observation[i] = obs
            reward = float(reward)
            rewards[i] = reward
            terminal[i] = terminated
            end = terminated or truncated
            last[i] = end
            infos[i] = info
            returns[i] += reward
            lengths[i] += 1
            if reward > peaks[i]:
                peaks[i] = reward
            if end:
                done.append(i)
        self.is_first[:] = False
        return done


def rollout(policy: Any, envs: Sequence[Any], steps: int | None = None, *, episodes: int | None = None,
            state: Any = None, mode: str = "mode", seeds: Sequence[int | None] | None = None,
            record: Collection[str] = ("observations", "actions", "rewards", "is_first"),
            on_act: Callable[[int, np.ndarray, Any], None] | None = None) -> dict[str, Any]:
    """Plays `envs` with `policy` (one `act` call for all per step) from a reset of each
    (environment i with `seeds[i]`, default none) and the policy state `state` (default
    `policy.initial_state(N)`), for either

    steps: agent steps of every environment; an episode that ends restarts (a reset without a
        seed) with `is_first` set. Records are arrays `[N, steps + 1, ...]` (at every observation:
        the reset one, then one per step) or `[N, steps, ...]` (at every step; action t led to
        observation t + 1);
    episodes: that many episodes, environment i playing episodes i, i + N, ...; each finished
        environment stops. Always returns "returns", "max_rewards" (each episode's largest step
        reward) and "lengths" (agent steps), lists in episode order; records are lists of one
        array per episode, `[T + 1, ...]` or `[T, ...]`.

    record: any of OBSERVATION_RECORDS, STEP_RECORDS, EPISODE_RECORDS (episodes only) and the
        names of extras the policy returns (e.g. "skill"). "xy" is left out of the result when an
        environment does not report its position.
    on_act(t, observation [N, ...], state): called after each policy call, on the observations
        acted on (valid during the call) and with the state that act returned. With steps, the
        policy then also acts on the last observation (its action is not taken), so that the state
        of every observation is seen.
    """
    if (steps is None) == (episodes is None):
        raise ValueError("rollout: give steps or episodes, one of them")
    count = steps if steps is not None else episodes
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"rollout: {'steps' if steps is not None else 'episodes'} must be an integer of at least 1, "
                         f"got {count!r}")
    record = {record} if isinstance(record, str) else set(record)
    if steps is not None and record & set(EPISODE_RECORDS):
        raise ValueError(f"rollout: {', '.join(sorted(record & set(EPISODE_RECORDS)))} are recorded per episode: "
                         "give episodes, not steps")
    stepper = Stepper(envs, policy, mode)
    stepper.reset(seeds, state)
    if steps is not None:
        return _play_steps(stepper, int(steps), record, on_act)
    return _play_episodes(stepper, int(episodes), record, on_act)


class _Tape:
    """Each environment's records of its running episode (or of the whole call)."""

    def __init__(self, n: int, record: set[str]) -> None:
        self.per_obs = [k for k in OBSERVATION_RECORDS if k in record]
        self.per_step = sorted(record - set(OBSERVATION_RECORDS) - set(EPISODE_RECORDS))
        self.has_xy = "xy" in record
        self.tracks = [self._empty() for _ in range(n)]

    def _empty(self) -> dict[str, list]:
        return {k: [] for k in (*self.per_obs, *self.per_step)}

    def observe(self, stepper: Stepper, rows: Sequence[int] | range) -> None:
        for i in rows:
            track = self.tracks[i]
            for key in self.per_obs:
                if key == "observations":
                    track[key].append(stepper.observation[i].copy())
                elif key == "is_first":
                    track[key].append(bool(stepper.is_first[i]))
                elif key == "xy":
                    xy = stepper.infos[i].get("xy")
                    if xy is None:
                        self.has_xy = False
                    track[key].append(xy)
                else:
                    track[key].append(np.array(stepper.envs[i].render(), copy=True))

    def acted(self, actions: np.ndarray, rewards: np.ndarray, extras: dict[str, np.ndarray] | None,
              rows: Sequence[int] | range) -> None:
        for key in self.per_step:
            if key == "actions":
                values = actions
            elif key == "rewards":
                values = rewards
            elif extras is None or key not in extras:
                known = ", ".join(OBSERVATION_RECORDS + STEP_RECORDS + EPISODE_RECORDS)
                raise ValueError(f"rollout: cannot record {key!r}: it is none of {known} and the policy's "
                                 f"extras hold {sorted(extras or {})}")
            else:
                values = np.asarray(extras[key])
            for i in rows:
                self.tracks[i][key].append(np.array(values[i], copy=True))

    def take(self, i: int) -> dict[str, np.ndarray]:
        """Environment i's records as arrays; its tape starts anew."""
        track, self.tracks[i] = self.tracks[i], self._empty()
        out = {}
        for key, values in track.items():
            if key == "xy":
                if self.has_xy:
                    out[key] = np.asarray(values, np.float64)
            elif key == "is_first":
                out[key] = np.asarray(values, bool)
            elif key in ("actions", "rewards"):
                out[key] = np.asarray(values, np.float32)
            else:
                out[key] = np.stack(values)
        return out


def _play_steps(stepper: Stepper, steps: int, record: set[str],
                on_act: Callable[[int, np.ndarray, Any], None] | None) -> dict[str, Any]:
    n = stepper.n
    tape = _Tape(n, record)
    every = range(n)
    for t in range(steps + 1):
        tape.observe(stepper, every)
        if t == steps and on_act is None:
            break
        actions, extras = stepper.act()
        if on_act is not None:
            on_act(t, stepper.observation, stepper.state)
        if t == steps:
            break
        for i in stepper.step(actions):
            stepper.restart(i)
        tape.acted(actions, stepper.reward, extras, every)
    tracks = [tape.take(i) for i in every]
    return {key: np.stack([track[key] for track in tracks]) for key in tracks[0]}


def _play_episodes(stepper: Stepper, episodes: int, record: set[str],
                   on_act: Callable[[int, np.ndarray, Any], None] | None) -> dict[str, Any]:
    n = stepper.n
    quota = [len(range(i, episodes, n)) for i in range(n)]  # episodes each environment plays
    running = np.array([q > 0 for q in quota])
    finished: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    tape = _Tape(n, record)
    goals = "goals" in record
    goal = [info.get("goal") for info in stepper.infos]
    tape.observe(stepper, np.flatnonzero(running).tolist())
    t = 0
    while running.any():
        actions, extras = stepper.act()
        if on_act is not None:
            on_act(t, stepper.observation, stepper.state)
        t += 1
        rows = np.flatnonzero(running).tolist()
        done = stepper.step(actions, running)
        tape.acted(actions, stepper.reward, extras, rows)
        tape.observe(stepper, rows)  # an episode's last observation too, before its restart
        for i in done:
            episode = {"return": stepper.episode_return[i], "max_reward": stepper.episode_peak[i],
                       "length": stepper.episode_length[i], **tape.take(i)}
            if goals:
                episode["goals"] = goal[i]
            finished[i].append(episode)
            if len(finished[i]) == quota[i]:
                running[i] = False
            else:
                goal[i] = stepper.restart(i).get("goal")
                tape.observe(stepper, [i])
    order = [finished[i][k] for k in range(max(quota)) for i in range(n) if k < quota[i]]  # episode order
    out: dict[str, Any] = {"returns": [e["return"] for e in order], "max_rewards": [e["max_reward"] for e in order],
                           "lengths": [e["length"] for e in order]}
    keys = [k for k in order[0] if k not in ("return", "max_reward", "length")]
    for key in keys:
        if key == "xy" and not tape.has_xy:
            continue
        out[key] = [e[key] for e in order]
    return out


__all__ = ["Stepper", "rollout", "OBSERVATION_RECORDS", "STEP_RECORDS", "EPISODE_RECORDS"]
