"""Opening a pretraining snapshot: `Snapshot`, the one way every command (fine-tuning's start,
evaluate, plan, visualize, the benchmarks) opens one, and `load_snapshot` -> `Pretrained`, a
snapshot as one Python object for analyses you script yourself.

    import numpy as np
    import choreo

    pre = choreo.load_snapshot("runs/<run>/snapshots/snapshot_2000000.pt")  # or ..., "task=walker_run"
    print(pre.config.env.task, pre.frames, pre.obs_shape, pre.action_dim, pre.num_skills)
    out = pre.run_skills(np.array([0, 3, 7]), steps=100)    # Choreographer: one code per environment
    out["observations"].shape                                # (3, 101, *obs_shape)
    out["actions"].shape, out["rewards"].shape               # (3, 100, action_dim), (3, 100)
    policy = pre.policy("explore", seed=1)                   # an acting policy with the snapshot's weights
    envs = pre.make_envs(4, seed=1)                          # a gymnasium SyncVectorEnv of the run's task
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

`rollout` (`choreo.actors.rollout`, the one loop that every caller steps environments with) is
underneath, for any acting policy and state: steps or whole episodes, recording what is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from choreo.actors.rollout import rollout
from choreo.launch.runtime.config import Config, ConfigError, ConfigFile, as_config_file
from choreo.vocabulary import derive_seed

if TYPE_CHECKING:
    from gymnasium.vector import SyncVectorEnv

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
        (Choreographer's exploration actor) or "meta" (the meta-controller: a new code every step
        once the snapshot's reward gate has opened, which only fine-tuning does; random codes held
        for `random_skill_every` steps before that, so a pretraining snapshot's). skill: the skills `initial_state(n)` gives
        without any (`set_skills`). seed: the policy's random draws (mode "sample")."""
        from choreo.agents.registry import make_policy

        policy = make_policy(self.config.algo, self.obs_shape, self.action_dim, self.config.agent,
                             behaviour=behaviour, seed=seed, skill=skill)
        policy.load_weights(self.agent.policy_weights(), self.updates)
        return policy

    def make_envs(self, n: int, seed: int = 0) -> SyncVectorEnv:
        """A gymnasium vector environment of n environments of the config's task (`config.env`),
        `gymnasium.vector.SyncVectorEnv`: `reset()` starts environment i from its own seed
        `derive_seed(seed, "env", i)`, `step(actions [n, A])` steps them all (gymnasium's
        autoreset: an episode that ends restarts on the next step), `.envs` holds the single
        environments. Close it when done (`close()`)."""
        from functools import partial

        from gymnasium.vector import SyncVectorEnv

        from choreo.actors.envs import make_env_from_config

        if n < 1:
            raise ValueError(f"make_envs: n must be at least 1, got {n}")
        return SyncVectorEnv([partial(make_env_from_config, self.config.env, seed=derive_seed(seed, "env", i))
                              for i in range(n)])

    def run_skills(self, skills: Any, steps: int, envs: SyncVectorEnv | Sequence[Any] | None = None,
                   mode: str = "mode", seed: int = 0) -> dict[str, np.ndarray]:
        """Plays environment i with skill `skills[i]` for `steps` agent steps, all environments
        stepped together by the skill policy (one batched call per step), the skill held for the
        whole call. skills: Choreographer, `[N]` integer codes; DADS, `[N, D]` vectors (or `[N]`
        indices of discrete skills). envs: N environments of this snapshot's observation and action
        shapes, the vector environment of `make_envs` or a sequence of single ones (default:
        `make_envs(N, seed)`, closed afterwards); a vector environment's single environments are
        stepped one by one, so reset it before stepping it yourself again. Every environment is
        reset first, environment i with seed `derive_seed(seed, "reset", i)`; the policy is seeded
        with `seed`.
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
        own = self.make_envs(n, seed) if envs is None else None
        try:
            played = _single_envs(own if own is not None else envs)
            self._check_envs(played, n)
            policy = self.policy("skill", seed=seed)
            state = policy.initial_state(n, skill=skills)
            out = rollout(policy, played, int(steps), state=state, mode=mode,
                          seeds=[derive_seed(seed, "reset", i) for i in range(n)],
                          record=("observations", "actions", "rewards", "is_first", "xy"))
        finally:
            if own is not None:
                own.close()
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


def _single_envs(envs: Any) -> list[Any]:
    """The single environments of a vector environment that holds them in this process (`.envs`,
    as SyncVectorEnv does), or of a sequence: the rollout steps environments one by one."""
    from gymnasium.vector import VectorEnv

    if isinstance(envs, VectorEnv):
        single = getattr(envs, "envs", None)
        if single is None:
            raise ValueError(f"run_skills: a {type(envs).__name__} runs its environments in other processes; give "
                             "the SyncVectorEnv of make_envs, or a list of environments")
        return list(single)
    return list(envs)


def load_snapshot(path: str | os.PathLike, *overrides: str, device: str = "cpu", task: str | None = None) -> Pretrained:
    """The snapshot at `path` ready for use: its run's config (with `key=value` overrides, any key;
    `task=...` short for `env.task=...`), the learner-side agent on `device` with its weights, and
    acting policies, environments and skill rollouts on demand (see `Pretrained`). Raises
    SnapshotError (file missing, damaged, not a snapshot, or an agent that does not fit the
    overrides) or ConfigError (a bad override), naming the file."""
    snapshot = Snapshot.open(path, (*overrides, *([f"env.task={task}"] if task is not None else [])))
    return Pretrained(snapshot.path, snapshot.config, snapshot.make_agent(device), snapshot.frames, snapshot.updates)


# ----------------------------------------------------------------------------- opening a snapshot


class Snapshot:
    """A snapshot file, opened: the one way to open one, for fine-tuning (the agent's starting
    weights), `choreo evaluate`, `choreo plan`, `choreo visualize`, the benchmarks and
    `load_snapshot`.

    `Snapshot.open(path, overrides)` reads the file (`learner.snapshot.load_snapshot`: tensors and
    plain containers, without running code) and resolves the config it is used with: the saved
    run config with `key=value` overrides (`task=` short for `env.task=`), put into `mode` first
    when given (`config.in_mode`), or the caller's own `config` (a fine-tuning run's). Then
    `state_for(agent)` checks that the snapshot fits an agent and gives its state,
    `make_agent(device)` builds an agent of the config with the snapshot's weights, and
    `policy_weights()` the acting weights. Errors name the file: SnapshotError for a missing,
    damaged or foreign file, a directory, or an agent that does not fit (with the config keys that
    decide shapes and differ, saved -> now); ConfigError for a bad override or an environment of
    the config that cannot be built."""

    def __init__(self, path: Path, data: Mapping[str, Any], config: Config) -> None:
        self.path = path
        """The snapshot file."""
        self.data = data
        """The file's contents: "agent" (the state), "config" (the saved run config, a dict),
        "frames", "updates"."""
        self.config = config
        """The config the snapshot is used with (see `open`)."""
        self.frames: int = int(data["frames"])
        """Environment frames of pretraining when the snapshot was written."""
        self.updates: int = int(data["updates"])
        """Learner updates when the snapshot was written."""
        self._policy_weights: dict | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, overrides: Sequence[str] = (), config: Config | None = None,
             mode: str | None = None, config_file: str | os.PathLike | ConfigFile | None = None) -> Snapshot:
        """Open the snapshot file at `path` (see the class docstring). mode, config_file (a
        `--config FILE`) and overrides apply to the saved config, in that order; config replaces it
        (then none of them may be given)."""
        from choreo.learner.snapshot import SnapshotError
        from choreo.learner.snapshot import load_snapshot as read_snapshot

        path = Path(path).expanduser()
        if config is not None and (overrides or mode or config_file is not None):
            raise ValueError("Snapshot.open: overrides, mode and config_file apply to the saved config; with a "
                             "config of your own, give neither overrides, mode nor config_file")
        for o in overrides:
            if not isinstance(o, str):
                raise ConfigError(f"{path}: overrides are 'key=value' strings, got {o!r}")
        file = as_config_file(config_file)  # its errors name that file, and come before the snapshot is read
        if path.is_dir():
            raise SnapshotError(_directory_message(path))
        data = read_snapshot(path)
        if config is None:
            config = _saved_config(path, data["config"], overrides, mode, file)
        return cls(path, data, config)

    def with_config(self, config: Config) -> Snapshot:
        """The same snapshot used with `config` (e.g. a command's, derived from `self.config`)."""
        return type(self)(self.path, self.data, config)

    def state_for(self, agent: Any) -> Mapping[str, Any]:
        """The agent state the snapshot holds, after checking that it fits `agent` (a fresh agent
        of `self.config`): SnapshotError naming the file, the first tensor that differs and the
        config keys that decide shapes and differ."""
        from choreo.launch.runtime.config import snapshot_shape_keys
        from choreo.learner.snapshot import check_compatible

        check_compatible(self.data, agent.state_dict(), self.path, self.config, snapshot_shape_keys(self.config))
        return self.data["agent"]

    def load_into(self, agent: Any) -> Any:
        """`agent` (a fresh one of `self.config`) with the snapshot's state loaded; returns it."""
        agent.load_state_dict(self.state_for(agent))
        return agent

    def make_agent(self, device: str = "cpu") -> Any:
        """A learner-side agent of `self.config` on `device` with the snapshot's weights."""
        from choreo.actors.envs import env_shapes
        from choreo.agents.registry import make_agent

        try:
            agent = make_agent(self.config.algo, *env_shapes(self.config.env), self.config.agent, seed=0, device=device)
        except ConfigError:
            raise
        except ValueError as e:  # e.g. an environment of the overrides that cannot be built
            raise ConfigError(f"{self.path}: {e}") from None
        return self.load_into(agent)

    def policy_weights(self) -> dict:
        """The acting weights (`agent.policy_weights()`) of an agent of `self.config` with the
        snapshot's state; computed once (on the CPU)."""
        if self._policy_weights is None:
            self._policy_weights = self.make_agent().policy_weights()
        return self._policy_weights


def _saved_config(path: Path, saved: Mapping[str, Any], overrides: Sequence[str], mode: str | None,
                  file: ConfigFile | None = None) -> Config:
    """The run config a snapshot holds, validated, put into `mode` when given, with the config
    file's keys and `key=value` overrides applied; errors name the file."""
    from choreo.launch.runtime.config import from_dict, in_mode

    try:
        own = from_dict(saved)
    except ConfigError as e:
        raise ConfigError(f"{path}: the snapshot's config: {e}") from None
    try:
        return in_mode(own, mode, overrides, file) if mode else from_dict(saved, overrides, file)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _directory_message(path: Path) -> str:
    """What to say for a directory given as a snapshot: which of its snapshots to give instead."""
    from choreo.launch.runtime.rundir import RunDir
    from choreo.learner.files import SNAPSHOT_PATTERN, SNAPSHOTS, snapshot_name

    found = sorted(path.glob(SNAPSHOT_PATTERN), key=lambda p: p.stat().st_mtime) or RunDir(path).snapshot_files()
    if found:
        return (f"snapshot {path}: is a directory, not a snapshot file; give one of its {len(found)} "
                f"snapshot{'s' if len(found) > 1 else ''}, e.g. {found[-1]} (the latest)")
    return (f"snapshot {path}: is a directory, not a snapshot file, and holds no snapshots; give a file such as "
            f"<run>/{SNAPSHOTS}/{snapshot_name(100000)}")


__all__ = ["Pretrained", "Snapshot", "load_snapshot", "rollout"]
