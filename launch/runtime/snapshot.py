"""A pretraining snapshot as one Python object, for analyses you script yourself.

    import numpy as np
    import choreo

    pre = choreo.load_snapshot("runs/<run>/snapshots/snapshot_2000000.pt")  # or ..., "task=walker_run"
    print(pre.config.env.task, pre.frames, pre.obs_shape, pre.action_dim, pre.num_skills)
    out = pre.run_skills(np.array([0, 3, 7]), steps=100)    # Choreographer: one code per environment
    out["observations"].shape                                # (3, 101, *obs_shape)
    out["actions"].shape, out["rewards"].shape               # (3, 100, action_dim), (3, 100)
    policy = pre.policy("explore", seed=1)                   # an acting policy with the snapshot's weights
    envs = pre.make_envs(4, seed=1)                          # environments of the run's task
    pre.agent                                                # the learner-side agent (world model, ...)

`load_snapshot(path, *overrides, device="cpu", task=None) -> Pretrained` reads the snapshot (a
file of tensors and plain containers, read without running code), resolves the run's config with
`key=value` overrides applied (any key, as on the command line; `task=` is short for `env.task=`,
which may name another task of the same domain), builds the learner-side agent on `device` and
loads the snapshot's weights into it. Errors are `SnapshotError` (a missing, damaged or foreign
file; an agent that does not fit, naming the config keys that differ) and `ConfigError` (a bad
override), each naming the file.

`Pretrained.run_skills` plays a batch of environments, each with a skill the caller chose, held
for the whole call (across episode ends), through the skill policy's state: Choreographer takes
one code per environment (`[N]` integers in 0..num_skills - 1), DADS one skill vector per
environment (`[N, D]`; discrete skills also as `[N]` indices). With mode "mode" (the default)
acting is deterministic: the posterior latent is each categorical's mode and the action the mean.

`rollout` is the loop underneath, for any acting policy and state (`launch/runtime/media.py` plays its
skill videos with it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from choreo.launch.runtime.config import Config, ConfigError
from choreo.vocabulary import derive_seed

MODES = ("sample", "mode")


class Pretrained:
    """A snapshot loaded for use from Python (see `load_snapshot` and the module docstring)."""

    def __init__(self, path: Path, config: Config, agent: Any, frames: int, updates: int) -> None:
        self.path = path
        """The snapshot file."""
        self.config = config
        """The run's resolved config, with the overrides given to `load_snapshot`."""
        self.agent = agent
        """The learner-side agent holding the snapshot's weights (`agent.wm`, `agent.skills`, ...)."""
        self.frames = frames
        """Environment frames of pretraining when the snapshot was written."""
        self.updates = updates
        """Learner updates when the snapshot was written (the acting weights' version)."""
        self.obs_shape: tuple[int, ...] = tuple(agent.obs_shape)
        """The observation shape: `(D,)` states or `(3, 64, 64)` uint8 pixels."""
        self.action_dim: int = int(agent.action_dim)
        """The action size; actions are in [-1, 1]."""

    def __repr__(self) -> str:
        return (f"Pretrained({str(self.path)!r}, algo={self.config.algo}, task={self.config.env.task}, "
                f"obs={self.config.env.obs}, frames={self.frames:,}, skills={self.num_skills} ({self.skill_type}))")

    @property
    def skill_type(self) -> str:
        """"code" (Choreographer's codebook), or DADS's "continuous" or "discrete"."""
        return "code" if self.config.algo == "choreographer" else self.config.agent.dads.skill_type

    @property
    def num_skills(self) -> int:
        """Choreographer: the number of codes; DADS: the skill dimension D."""
        if self.config.algo == "choreographer":
            return self.config.agent.choreographer.num_codes
        return self.config.agent.dads.skill_dim

    def policy(self, behaviour: str = "skill", seed: int = 0, skill: Any = None) -> Any:
        """An acting policy of the run's algorithm with the snapshot's acting weights (on the CPU):
        `initial_state(n, skill=...)`, `act(observation [N, ...], is_first [N], state, mode) ->
        (action [N, A], state, extras)`. behaviour: "skill" (the skills you give), "explore"
        (Choreographer's exploration actor) or "meta" (the meta-controller; a snapshot's reward
        gate is closed, so it holds random codes). skill: the skills `initial_state(n)` gives
        without any (`set_skills`). seed: the policy's random draws (mode "sample")."""
        from choreo.agents.registry import make_policy

        policy = make_policy(self.config.algo, self.obs_shape, self.action_dim, self.config.agent,
                             behaviour=behaviour, seed=seed, skill=skill)
        policy.load_weights(self.agent.policy_weights(), self.updates)
        return policy

    def make_envs(self, n: int, seed: int = 0) -> list[Any]:
        """n environments of the config's task (`config.env`), environment i seeded with
        `derive_seed(seed, "env", i)`. Close them when done (`env.close()`)."""
        from choreo.actors.envs import make_env_from_config

        if n < 1:
            raise ValueError(f"make_envs: n must be at least 1, got {n}")
        return [make_env_from_config(self.config.env, seed=derive_seed(seed, "env", i)) for i in range(n)]

    def run_skills(self, skills: Any, steps: int, envs: Sequence[Any] | None = None, mode: str = "mode",
                   seed: int = 0) -> dict[str, np.ndarray]:
        """Plays environment i with skill `skills[i]` for `steps` agent steps, all environments
        stepped together by the skill policy (one batched call per step), the skill held for the
        whole call. skills: Choreographer, `[N]` integer codes; DADS, `[N, D]` vectors (or `[N]`
        indices of discrete skills). envs: N environments of this snapshot's observation and action
        shapes (default: `make_envs(N, seed)`, closed afterwards). Every environment is reset first,
        environment i with seed `derive_seed(seed, "reset", i)`; the policy is seeded with `seed`.
        mode: "mode" (deterministic: latent modes and mean actions) or "sample".

        Returns numpy arrays: "observations" `[N, steps + 1, *obs_shape]` (the reset observation,
        then one per step), "actions" `[N, steps, A]` (action t led to observation t + 1),
        "rewards" `[N, steps]`, "is_first" `[N, steps + 1]` (an episode that ends within the call
        restarts: observation t + 1 is then the new episode's first), "skills" (as given, checked),
        and for navigation tasks "xy" `[N, steps + 1, 2]`, the x-y position at each observation."""
        if mode not in MODES:
            raise ValueError(f"run_skills: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"run_skills: steps must be an integer of at least 1, got {steps!r}")
        skills = self._check_skills(skills)
        n = len(skills)
        own = envs is None
        if own:
            envs = self.make_envs(n, seed)
        try:
            self._check_envs(envs, n)
            policy = self.policy("skill", seed=seed)
            state = policy.initial_state(n, skill=skills)
            out = rollout(policy, envs, state, int(steps), mode, [derive_seed(seed, "reset", i) for i in range(n)])
        finally:
            if own:
                for env in envs:
                    env.close()
        out["skills"] = skills
        return out

    def _check_skills(self, skills: Any) -> np.ndarray:
        """One skill per environment, of this snapshot's kind and range, as a numpy array."""
        import torch

        array = skills.detach().cpu().numpy() if isinstance(skills, torch.Tensor) else np.asarray(skills)
        k = self.num_skills
        if self.skill_type == "code" or (self.skill_type == "discrete" and array.dtype.kind in "iu"):
            what = "codes" if self.skill_type == "code" else "skill indices"
            if array.ndim != 1 or not len(array) or array.dtype.kind not in "iu":
                raise ValueError(f"run_skills: skills are one integer code per environment, an array [N] of {what} "
                                 f"in 0..{k - 1}; got {array.dtype} of shape {array.shape}")
            outside = array[(array < 0) | (array >= k)]
            if outside.size:
                raise ValueError(f"run_skills: skill {int(outside[0])} is out of range 0..{k - 1} (this snapshot "
                                 f"has {k} {what.split()[-1]})")
            return array.astype(np.int64)
        if array.ndim != 2 or array.shape[1] != k or not len(array) or array.dtype.kind not in "fiu":
            raise ValueError(f"run_skills: skills are one vector of {k} numbers per environment, an array [N, {k}]"
                             f"{' (or [N] indices)' if self.skill_type == 'discrete' else ''}; got {array.dtype} "
                             f"of shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("run_skills: skills must be finite")
        return array.astype(np.float32)

    def _check_envs(self, envs: Sequence[Any], n: int) -> None:
        if len(envs) != n:
            raise ValueError(f"run_skills: {n} skills for {len(envs)} environments; give one skill per environment")
        for i, env in enumerate(envs):
            obs_shape = tuple(env.observation_space.shape)
            action_dim = int(np.prod(env.action_space.shape))
            if obs_shape != self.obs_shape or action_dim != self.action_dim:
                raise ValueError(f"run_skills: environment {i} has observations {obs_shape} and {action_dim} actions; "
                                 f"the snapshot {self.path} acts on observations {self.obs_shape} with "
                                 f"{self.action_dim} actions ({self.config.env.task}, {self.config.env.obs})")


def load_snapshot(path: str | os.PathLike, *overrides: str, device: str = "cpu", task: str | None = None) -> Pretrained:
    """The snapshot at `path` ready for use: its run's config (with `key=value` overrides, any key;
    `task=...` short for `env.task=...`), the learner-side agent on `device` with its weights, and
    acting policies, environments and skill rollouts on demand (see `Pretrained`). Raises
    SnapshotError (file missing, damaged, not a snapshot, or an agent that does not fit the
    overrides) or ConfigError (a bad override), naming the file."""
    from choreo.learner.snapshot import SnapshotError
    from choreo.learner.snapshot import load_snapshot as read_snapshot

    path = Path(path).expanduser()
    for o in overrides:
        if not isinstance(o, str):
            raise ConfigError(f"{path}: overrides are 'key=value' strings, got {o!r}")
    overrides = tuple("env." + o if o.startswith("task=") else o for o in overrides)
    if task is not None:
        overrides += (f"env.task={task}",)
    data = read_snapshot(path)
    try:
        config = snapshot_config(data["config"], overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        agent = load_agent(config, path, device=device, data=data)
    except ValueError as e:
        if isinstance(e, SnapshotError):
            raise
        raise ConfigError(f"{path}: {e}") from None  # e.g. an environment of the overrides that cannot be built
    return Pretrained(path, config, agent, int(data["frames"]), int(data["updates"]))


# ----------------------------------------------------------------------------- the loop


def rollout(policy: Any, envs: Sequence[Any], state: Any, steps: int, mode: str = "mode",
            seeds: Sequence[int | None] | None = None,
            on_act: Callable[[int, np.ndarray, Any], None] | None = None) -> dict[str, np.ndarray]:
    """Plays `envs` together for `steps` agent steps with `policy` (one `act` call for all per step),
    from a reset of each (environment i with `seeds[i]`, default none) and the policy state `state`
    (`policy.initial_state(len(envs), ...)`). An episode that ends restarts (a reset without a
    seed) with `is_first` set, which resets the policy's state of that environment.

    on_act(t, observation [N, ...], state): called after the policy acted on observation t
        (t = 0..steps), with the state that act returned; given, the policy also acts on the last
        observation (its action is not taken), so that the state of every observation is seen.
    Returns "observations" `[N, steps + 1, ...]`, "actions" `[N, steps, A]` float32, "rewards"
    `[N, steps]` float32, "is_first" `[N, steps + 1]` bool and, when every environment reports its
    position (`info["xy"]`, the navigation tasks), "xy" `[N, steps + 1, 2]` float64."""
    n = len(envs)
    seeds = [None] * n if seeds is None else list(seeds)
    resets = [env.reset(seed=s) for env, s in zip(envs, seeds)]
    observation = np.stack([obs for obs, _ in resets])
    action_dim = int(np.prod(envs[0].action_space.shape))
    observations = np.empty((n, steps + 1, *observation.shape[1:]), observation.dtype)
    actions = np.zeros((n, steps, action_dim), np.float32)
    rewards = np.zeros((n, steps), np.float32)
    is_first = np.zeros((n, steps + 1), bool)
    xy = np.full((n, steps + 1, 2), np.nan)
    has_xy = all("xy" in info for _, info in resets)
    first = np.ones(n, bool)
    infos = [info for _, info in resets]
    for t in range(steps + 1):
        observations[:, t] = observation
        is_first[:, t] = first
        if has_xy:
            xy[:, t] = [info["xy"] for info in infos]
        if t == steps and on_act is None:
            break
        action, state, _ = policy.act(observation, first, state, mode=mode)
        if on_act is not None:
            on_act(t, observation, state)
        if t == steps:
            break
        action = np.asarray(action, np.float32).reshape(n, action_dim)
        actions[:, t] = action
        observation = observation.copy()
        for i, env in enumerate(envs):
            obs, reward, terminated, truncated, info = env.step(action[i])
            rewards[i, t] = reward
            first[i] = terminated or truncated
            if first[i]:
                obs, info = env.reset()
            observation[i], infos[i] = obs, info
            has_xy = has_xy and "xy" in info
    out = {"observations": observations, "actions": actions, "rewards": rewards, "is_first": is_first}
    if has_xy:
        out["xy"] = xy
    return out


__all__ = ["Pretrained", "load_snapshot", "rollout"]


def snapshot_config(saved: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """The run config a snapshot holds, with `key=value` overrides (any key) applied, validated."""
    from choreo.launch.runtime.config import ConfigError, from_dict

    try:
        from_dict(saved)
    except ConfigError as e:
        raise ConfigError(f"the snapshot's config: {e}") from None
    return from_dict(saved, overrides)


def load_agent(config: Config, snapshot: Path, device: str = "cpu", data: Mapping[str, Any] | None = None) -> Any:
    """An agent of `config` on `device` with the weights of `snapshot` (SnapshotError, naming the
    file and the keys that differ, when it does not fit). data: the snapshot already read."""
    from choreo.agents.registry import make_agent
    from choreo.launch.runtime.build import env_shapes
    from choreo.launch.runtime.config import snapshot_shape_keys
    from choreo.learner.snapshot import check_compatible, load_snapshot

    agent = make_agent(config.algo, *env_shapes(config), config.agent, seed=0, device=device)
    if data is None:
        data = load_snapshot(snapshot, expected=agent.state_dict(), config=config,
                             shape_keys=snapshot_shape_keys(config))
    else:
        check_compatible(data, agent.state_dict(), snapshot, config, snapshot_shape_keys(config))
    agent.load_state_dict(data["agent"])
    return agent
