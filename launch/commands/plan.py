"""`choreo plan`: zero-shot model-predictive control over sequences of skills, no fine-tuning.

A DADS snapshot plans with its skill dynamics q (MPPI over continuous skills, or over its discrete
ones); a Choreographer snapshot plans over its codebook skills with the world model's imagination
(the skill policy acts inside the model, the task reward is computed on decoded states). Both
score predicted states with the task's own reward function, so the task must be a navigation task
with goals (`point_mass_nav`, `ant_nav`, dense or sparse with `env.goal_reward`). `--policy random`
runs the same skill policies with random skills held as long: the baseline.

Episodes run as jobs, Ray tasks spread over the cluster's CPUs (`--local`: in this process), each
an environment worker (`EnvRunner`) whose policy is the planner: jobs build their environments and
load the snapshot themselves. The metric is the paper's normalised distance to the goal,
Delta = (1/H) sum_t ||g - u_t|| / ||g - u_0|| (lower is better; 1 is standing still).

Results go to a run directory of their own: `plan.jsonl` (every episode: goal, Delta, return,
final distance), `plan.json` (the summary) and one line of `eval.jsonl` (mode `plan` or
`plan_random`), which `choreo report` shows beside fine-tuning runs of the same task.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from choreo.launch.runtime.config import Config, ConfigError
from choreo.launch.runtime.jobs import run_jobs
from choreo.launch.runtime.rundir import EvalRecord, RunDir
from choreo.vocabulary import derive_seed

PLAN_ENVS = 10
"""Environments one job steps together (the planner plans for all of them in one batch)."""
JOB_EPISODES = 10
"""Episodes per job."""


def goal_rewards(envs: list) -> Any:
    """The planners' reward function for `envs`: predicted observations [M, K, H, D] of the
    environments `env` [M] -> each one's task reward [M, K, H], computed by its environment's own
    goal reward on the predicted x-y positions with its current goal."""
    import torch

    def reward(observations: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        index = env.tolist()
        tasks = [envs[i].unwrapped for i in index]
        x, y = tasks[0].xy_indices
        xy = observations[..., [x, y]].detach().float().cpu().numpy()  # [M, K, H, 2]
        out = np.stack([task.goal_reward(xy[m], task.goal) for m, task in enumerate(tasks)])
        return torch.as_tensor(out, dtype=observations.dtype, device=observations.device)

    return reward


def planning_policy(config: Config, agent: Any, envs: list, policy: str, seed: int) -> Any:
    """The planner of `agent` (DADS: over its skills with q; Choreographer: over its codes with the
    world model) bound to the goals of `envs`, or (policy "random") random skills held as long."""
    from choreo.agents.planning import CodebookPlanningPolicy, DadsPlanningPolicy, RandomSkillPolicy

    cfg = config.agent.planner
    if policy == "random":
        return RandomSkillPolicy(agent, cfg, seed=seed)
    cls = DadsPlanningPolicy if config.algo == "dads" else CodebookPlanningPolicy
    return cls(agent, goal_rewards(envs), cfg, seed=seed)


def run_job(config: Config, snapshot: str, episodes: int, index: int, policy: str) -> dict[str, Any]:
    """One job: `episodes` episodes on `min(episodes, PLAN_ENVS)` environments seeded for job
    `index`, acting with the planner (its skills executed with sampled or mean actions, as
    agent.planner.execute says); returns the runner's evaluation with the
    episodes' positions and goals."""
    import torch

    from choreo.actors.envs import make_env_from_config
    from choreo.actors.runner import EnvRunner, env_seed
    from choreo.agents.planning import execution_mode
    from choreo.launch.runtime.snapshot import Snapshot

    torch.set_num_threads(1)
    root = derive_seed(config.seed, "plan")
    envs = [make_env_from_config(config.env, seed=env_seed(root, index, i)) for i in range(min(episodes, PLAN_ENVS))]
    try:
        agent = Snapshot.open(snapshot, config=config).make_agent()
        agent.eval()
        planner = planning_policy(config, agent, envs, policy, derive_seed(root, "job", index))
        runner = EnvRunner(envs, planner, chunk_length=1, runner_id=index, seed=root,
                           mode=execution_mode(config.agent.planner))
        return runner.evaluate(episodes, positions=True)
    finally:
        for env in envs:
            env.close()


def summarise(jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-episode records and the summary: mean normalised distance and return with standard errors."""
    from choreo.actors.envs import normalised_distance

    episodes = []
    for job in jobs:
        for ret, xy, goal in zip(job["returns"], job["xy"], job["goals"]):
            xy, goal = np.asarray(xy), np.asarray(goal)
            episodes.append({"goal": goal.tolist(), "normalised_distance": normalised_distance(xy, goal),
                             "return": ret, "start_distance": float(np.linalg.norm(goal - xy[0])),
                             "final_distance": float(np.linalg.norm(goal - xy[-1]))})

    def mean_se(key: str) -> tuple[float, float]:
        values = np.array([e[key] for e in episodes], np.float64)
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        return float(values.mean()), se

    (delta, delta_se), (ret, ret_se) = mean_se("normalised_distance"), mean_se("return")
    final, _ = mean_se("final_distance")
    return episodes, {"episodes": len(episodes), "normalised_distance": delta, "normalised_distance_se": delta_se,
                      "mean_return": ret, "return_se": ret_se, "final_distance": final}


def plan(config: Config, snapshot: Path, run_dir: str | os.PathLike, episodes: int, policy: str,
         local: bool = False, address: str | None = None, stream=None) -> dict[str, Any]:
    """Runs the jobs (on Ray unless `local`), writes the results into `run_dir`, returns the summary."""
    sizes = [JOB_EPISODES] * (episodes // JOB_EPISODES) + ([episodes % JOB_EPISODES] if episodes % JOB_EPISODES else [])
    start = time.monotonic()
    results = run_jobs(run_job, [(config, str(snapshot), n, i, policy) for i, n in enumerate(sizes)], local=local,
                       address=address, sizes=sizes, label="choreo plan", stream=stream)
    records, summary = summarise(results)
    seconds = time.monotonic() - start
    mode = "plan" if policy == "plan" else "plan_random"
    summary = {"task": config.env.task, "algo": config.algo, "policy": policy, "snapshot": str(snapshot),
               "goal_reward": config.env.goal_reward, "planner": dataclasses.asdict(config.agent.planner),
               **summary, "seconds": seconds}
    out = RunDir(run_dir)
    out.write_results("plan", records, summary)
    # For `choreo report`, beside fine-tuning runs of the task: no frame or update on the task yet.
    out.append_eval(EvalRecord.of(config.env.task, config.seed, 0, 0, mode, [r["return"] for r in records],
                                  normalised_distance=summary["normalised_distance"]))
    return summary


def plan_command(args: argparse.Namespace) -> int:
    """`choreo plan --snapshot FILE task=TASK [--episodes N] [--policy plan|random] [key=value ...]`."""
    from choreo.launch.runtime.snapshot import Snapshot
    from choreo.learner.snapshot import SnapshotError

    os.environ.setdefault("MUJOCO_GL", "egl")
    snapshot = Path(args.snapshot).expanduser().resolve()
    # The snapshot's own config (its algorithm and sizes), on the task and with the planner asked for.
    # run_name: a name of its own (<task>-<algo>-<time>), not the pretraining run's.
    overrides = ["dataset.dir=", "dataset.collect=false", "run_name="]
    overrides += [] if args.episodes is None else [f"eval.episodes={args.episodes}"]
    overrides += list(args.overrides)
    try:
        opened = Snapshot.open(snapshot, overrides, mode="plan", config_file=getattr(args, "config", None))
        config = opened.config
        if args.logdir:
            config = dataclasses.replace(config, logdir=args.logdir)
        _check_navigation(config)
        opened.with_config(config).make_agent()  # refused before anything starts when it does not fit
    except SnapshotError as e:
        raise ConfigError(str(e)) from None
    run_dir = RunDir.create(config, args.logdir)
    print(f"run directory: {run_dir}")
    summary = plan(config, snapshot, run_dir, config.eval.episodes, args.policy, local=args.local, address=args.address)
    what = "random skills" if args.policy == "random" else f"planning over the skills of {snapshot.name}"
    print(f"{config.env.task}, {what}: normalised distance {summary['normalised_distance']:.3f} "
          f"+- {summary['normalised_distance_se']:.3f}, return {summary['mean_return']:.1f}, final distance "
          f"{summary['final_distance']:.2f} over {summary['episodes']} episodes; {summary['seconds']:.0f} s; "
          f"results in {run_dir}")
    return 0


def _check_navigation(config: Config) -> None:
    from choreo.actors.envs import NAV_IDS

    if config.env.task not in NAV_IDS:
        raise ConfigError(f"config key 'env.task': planning scores predicted positions with a task's goal reward; "
                          f"use a navigation task ({', '.join(NAV_IDS)}), not {config.env.task!r}")
