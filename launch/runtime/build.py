"""The builder: every role of a run made from its resolved config, in one place.

The single-process loop, the Ray layer (inside each actor), the benchmarks, the tests and every
mode (pretraining, fine-tuning, offline, DADS, evaluation) build their environment workers, agent,
replay shards, sampler, rate limiter and learner with these functions, so that a role is made the
same way wherever it runs. Seeds all derive from `config.seed` (`choreo.vocabulary.derive_seed`).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from choreo import vocabulary as B
from choreo.actors.random_policy import UniformRandomPolicy
from choreo.actors.runner import EnvRunner, env_seed
from choreo.buffer.client import ReplayClient
from choreo.buffer.dataset import (STREAM_BASE, DatasetError, EpisodeSpec, LoadSummary, episode_label, load_into,
                                   open_dataset, split_episodes)
from choreo.buffer.limiter import RateLimiter
from choreo.buffer.shard import ReplayShard
from choreo.launch.runtime.config import Config, warmup_steps
from choreo.launch.runtime.plan import StartUp, resolve_plan
from choreo.launch.runtime.snapshot import Snapshot
from choreo.vocabulary import derive_seed


def random_steps_per_env(config: Config, num_runners: int | None = None) -> int:
    """Random seed steps per environment: `ceil(seed_frames / (action_repeat x runners x envs_per_actor))`,
    so that all environments of the run together take at least `learner.seed_frames` frames of
    random actions (the plan's `seed_frames`: none after a dataset was loaded). `num_runners`
    defaults to `config.num_actors`."""
    runners = config.num_actors if num_runners is None else num_runners
    per_step = config.env.action_repeat * runners * config.envs_per_actor
    return math.ceil(resolve_plan(config).seed_frames / per_step)


def make_runner(config: Config, runner_id: int, seed: int | None = None, behaviour: str | None = None,
                num_runners: int | None = None, mode: str = "sample", freeze_gc: bool = True,
                num_envs: int | None = None, random_steps: int | None = None) -> EnvRunner:
    """The runner of worker `runner_id`: `config.envs_per_actor` environments of `config.env`, the
    acting policy of `config.algo` (seeded with `derive_seed(seed, "runner", runner_id, "policy")`),
    chunks of `config.replay.chunk_length` rows and `random_steps_per_env(config, num_runners)`
    random seed steps. `seed` is the run's root seed (default `config.seed`). `num_runners` is how
    many runners share the seed phase (default `config.num_actors`; 1 for a single-process run).
    behaviour: the policy's (default: the run plan's; "random": uniform random
    actions); num_envs and random_steps override `config.envs_per_actor` and the seed phase.

    freeze_gc: call `gc.freeze()` once everything is built, so that the cyclic garbage collector
    no longer rescans the long-lived objects of torch, dm_control and the networks. Acting
    allocates many small objects per step, which triggers full collections; on walker_walk with 16
    envs they cost 10-15% of the step rate. Frozen objects are still freed by reference counting.
    """
    from choreo.actors.envs import make_env_from_config
    from choreo.agents.registry import make_policy

    seed = config.seed if seed is None else seed
    num_envs = config.envs_per_actor if num_envs is None else num_envs
    envs = [make_env_from_config(config.env, seed=env_seed(seed, runner_id, i)) for i in range(num_envs)]
    obs_shape = tuple(envs[0].observation_space.shape)
    action_dim = int(np.prod(envs[0].action_space.shape))
    policy_seed = derive_seed(seed, "runner", runner_id, "policy")
    if behaviour == "random":
        policy = UniformRandomPolicy(action_dim, policy_seed)
    else:
        policy = make_policy(config.algo, obs_shape, action_dim, config.agent,
                             behaviour=behaviour or resolve_plan(config).behaviour, seed=policy_seed)
    if random_steps is None:
        random_steps = random_steps_per_env(config, num_runners)
    runner = EnvRunner(envs, policy, config.replay.chunk_length, runner_id, seed, random_steps=random_steps, mode=mode)
    if freeze_gc:
        gc.collect()
        gc.freeze()
    return runner


def make_eval_runner(config: Config) -> EnvRunner:
    """The evaluation worker: `config.eval.episodes` environments seeded apart from the training
    ones (root seed `derive_seed(config.seed, "eval")`), the run's policy acting with its mean
    action, no random steps."""
    return make_runner(config, runner_id=0, seed=derive_seed(config.seed, "eval"), mode="mode",
                       num_envs=config.eval.episodes, random_steps=0)


def env_shapes(config: Config) -> tuple[tuple[int, ...], int]:
    """The observation shape and action size of the run's environment (one is built to read them)."""
    from choreo.actors.envs import env_shapes as shapes_of

    return shapes_of(config.env)


def make_agent(config: Config, obs_shape: tuple[int, ...], action_dim: int, start: bool = True,
               collective: Any = None, device: str | None = None) -> Any:
    """The learner-side agent of `config.algo` on `config.learner.device` (or `device`). start: put
    it at the mode's starting point (fine-tuning: the snapshot's weights, or random ones with
    `from_scratch`, then the switch to fine-tuning); False when a checkpoint is loaded next.
    collective: the learner group's (`choreo.learner.dist.join_group`), for a rank of several."""
    from choreo.agents.registry import make_agent as registered_agent

    group = {"collective": collective} if collective is not None and collective.active else {}
    agent = registered_agent(config.algo, obs_shape, action_dim, group_agent_config(config),
                             seed=derive_seed(config.seed, "learner"), device=device or config.learner.device, **group)
    plan = resolve_plan(config)
    if start and plan.phase == "finetune":
        pretrained = None
        if plan.start == "snapshot":
            pretrained = Snapshot.open(config.snapshot, config=config).state_for(agent)
        agent.start_finetuning(pretrained)
    if plan.phase == "offline":  # a phase, not state: set again when a checkpoint is loaded next
        agent.start_offline()
    return agent


def group_agent_config(config: Config) -> Any:
    """The agent's config for the learner group: under weak scaling every learning rate is
    multiplied by sqrt(num_learners), as RLlib's rule for DreamerV3 on several GPUs: the batch is
    num_learners times larger, its gradient's noise sqrt(num_learners) times smaller. One learner,
    or strong scaling (the same global batch), keeps the configured rates."""
    world = config.learner.num_learners
    if world == 1 or config.learner.scaling == "strong":
        return config.agent
    scale = math.sqrt(world)
    a = config.agent
    return dataclasses.replace(
        a,
        world_model=dataclasses.replace(a.world_model, lr=a.world_model.lr * scale),
        actor_critic=dataclasses.replace(a.actor_critic, actor_lr=a.actor_critic.actor_lr * scale,
                                         critic_lr=a.actor_critic.critic_lr * scale),
        choreographer=dataclasses.replace(a.choreographer, skill_lr=a.choreographer.skill_lr * scale))


def shard_args(config: Config, index: int) -> tuple[int, int, str]:
    """(capacity, seed, name) of replay shard `index`: the run's capacity split evenly over
    `config.num_shards` shards (never below one sequence)."""
    capacity = max(config.replay.capacity // config.num_shards, config.replay.batch_length)
    return capacity, derive_seed(config.seed, "shard", index), f"shard{index}"


def make_shard(config: Config, index: int) -> ReplayShard:
    return ReplayShard(*shard_args(config, index))


def make_limiter(config: Config, dataset_steps: int = 0) -> RateLimiter:
    """The samples-per-insert limiter; its warm-up is `replay.min_size` frames in agent steps
    (`warmup_steps`). With a dataset loaded (`dataset_steps`), its steps are the
    warm-up: the ratio counts only what the workers collect after it, and an offline-only run has
    no ratio (nothing is inserted while it trains)."""
    rc, plan = config.replay, resolve_plan(config)
    if not plan.dataset:
        return RateLimiter(rc.samples_per_insert, rc.tolerance, warmup_steps(config))
    return RateLimiter(rc.samples_per_insert if plan.workers else 0.0, rc.tolerance, dataset_steps)


# ----------------------------------------------------------------------------- datasets


def check_dataset(config: Config) -> tuple[int, list[str]]:
    """Before anything starts: the dataset folder exists and holds episodes, and its manifest (if
    any) can be read; or the Minari dataset is installed locally and can be opened. Returns
    (episodes, warnings: manifest entries whose files are missing); raises DatasetError naming the
    dataset or file."""
    source = open_dataset(config.dataset.dir, config.dataset.verify)
    return len(source.episodes()), source.warnings()


def dataset_renderer(config: Config) -> Callable[[np.ndarray], np.ndarray] | None:
    """For a pixel run, the function that renders frames from stored physics states (one
    environment, built on first use: a dataset of pixels never needs it)."""
    if config.env.obs != "pixels":
        return None
    made: list[Callable[[np.ndarray], np.ndarray]] = []

    def render(states: np.ndarray) -> np.ndarray:
        if not made:
            from choreo.actors.envs import physics_renderer

            made.append(physics_renderer(config.env))
        return made[0](states)

    return render


def replay_saved(config: Config, replay_dir: Path) -> bool:
    """Whether every replay shard of the run has a checkpoint in `replay_dir`."""
    return all((Path(replay_dir) / f"{shard_args(config, i)[2]}.msgpack").is_file() for i in range(config.num_shards))


def startup(config: Config, resume: bool, replay_dir: Path) -> StartUp:
    """What both loops do before their first step (`RunPlan.startup`), for a new run or a resumed one."""
    return resolve_plan(config).startup(resume, replay_saved(config, replay_dir))


def load_dataset(config: Config, shards: list[ReplayShard], obs_shape: tuple[int, ...], action_dim: int) -> int:
    """Loads the run's dataset into in-process shards (part i into shard i), showing progress, and
    reports it (`report_dataset`); returns the steps loaded."""
    _, warnings = check_dataset(config)
    total = LoadSummary(warnings=warnings)
    last = [time.monotonic()]

    def progress(part: LoadSummary) -> None:
        if time.monotonic() - last[0] > 5.0:
            last[0] = time.monotonic()
            print(f"loading dataset {config.dataset.dir}: {total.episodes + part.episodes:,} episodes, "
                  f"{total.steps + part.steps:,} steps", flush=True)

    for i, shard in enumerate(shards):
        total.merge(load_dataset_part(config, shard, i, obs_shape, action_dim, progress))
    return report_dataset(config, total)


def report_dataset(config: Config, summary: LoadSummary, shown: int = 20) -> int:
    """Prints the dataset's summary line, then each skipped file with why and each warning (the
    first `shown` of each); raises DatasetError when nothing could be loaded. Returns the steps."""
    location = config.dataset.dir
    for what, lines in (("skipped", [f"skipped {episode_label(location, name)}: {why}"
                                     for name, why in summary.skipped]),
                        ("warnings", [f"warning: {w}" for w in summary.warnings])):
        for line in lines[:shown]:
            print(line, flush=True)
        if len(lines) > shown:
            print(f"... and {len(lines) - shown} more {what}", flush=True)
    print(summary.line(location), flush=True)
    if not summary.steps:
        raise DatasetError(f"dataset {location}: no episode could be loaded ({summary.count(len(summary.skipped))} "
                           f"skipped, reasons above)")
    return summary.steps


def load_dataset_part(config: Config, shard: ReplayShard, index: int, obs_shape: tuple[int, ...], action_dim: int,
                      progress: Callable[[LoadSummary], None] | None = None) -> LoadSummary:
    """Loads shard `index`'s part of the run's dataset (every num_shards-th episode) into `shard`,
    checked against the folder's manifest when it has one and `dataset.verify` is on."""
    source = open_dataset(config.dataset.dir, config.dataset.verify)
    part = split_episodes(source.episodes(), config.num_shards)[index]
    spec = EpisodeSpec(tuple(obs_shape), int(action_dim), config.env.task)
    return load_into(shard, source, part, spec, dataset_renderer(config),
                     first_stream=STREAM_BASE + index * (1 << 32), progress=progress)


def make_sampler(config: Config, shards: list, call: Callable[..., Any] | None = None,
                 gather: Callable[[list], list] | None = None, rank: int = 0) -> ReplayClient:
    """The learner's view of the replay: batches drawn over all shards (`call`/`gather`: how
    shards are reached, e.g. Ray's `.remote` and `ray.get`). Each rank of a learner group draws
    from every shard with a generator of its own (rank 0's is a single learner's)."""
    seed = derive_seed(config.seed, "sampler") if rank == 0 else derive_seed(config.seed, "sampler", rank)
    return ReplayClient(shards, seed=seed, call=call, gather=gather,
                        refresh_every=config.replay.size_refresh_every)


def make_learner(config: Config, agent: Any, sample: Callable[[], Any], publish: Callable[[dict, int], None],
                 run_dir: Path, prefetch: int) -> Any:
    """The learner role around `agent`: `sample()` gives the next batch (or None), `publish`
    receives acting weights and their version. A rank of a learner group trains in the agent's group."""
    from choreo.agents.collective import SOLO
    from choreo.learner.learner import Learner

    return Learner(agent, sample, publish, config.learner, Path(run_dir), prefetch=prefetch, run_config=config,
                   snapshots_by_updates=resolve_plan(config).snapshots_by_updates, collective=getattr(agent, "collective", SOLO))


def random_batch(rng: np.random.Generator, obs_shape: tuple[int, ...], batch: int, length: int,
                 reward_scale: float = 0.0, action_dim: int = 6, skill_dim: int = 0) -> dict[str, np.ndarray]:
    """A batch `[batch, length, ...]` of random data of the given shapes (uint8 images for 3-D
    observations), for timing and testing the learner without environments (default: Walker's 6-dim
    actions)."""
    if len(obs_shape) == 3:
        obs = rng.integers(0, 256, (batch, length, *obs_shape), dtype=np.uint8)
    else:
        obs = rng.standard_normal((batch, length, *obs_shape), dtype=np.float32)
    is_first = np.zeros((batch, length), bool)
    is_first[:, 0] = True
    out = {
        B.OBSERVATION: obs,
        B.ACTION: rng.uniform(-1, 1, (batch, length, action_dim)).astype(np.float32),
        B.REWARD: (reward_scale * rng.random((batch, length))).astype(np.float32),
        B.IS_FIRST: is_first,
    }
    if skill_dim:  # DADS: the skill held and the behaviour log-probability of every step
        out[B.DISCOUNT] = np.ones((batch, length), np.float32)
        out[B.POLICY_VERSION] = np.zeros((batch, length), np.int64)
        out[B.SKILL_VECTOR] = rng.uniform(-1, 1, (batch, length, skill_dim)).astype(np.float32)
        out[B.BEHAVIOUR_LOGP] = rng.normal(size=(batch, length)).astype(np.float32)
    return out
