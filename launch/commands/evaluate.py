"""`choreo evaluate`: the pretrained skills without updates (zero-shot), or uniform random actions
as the baseline, measured the way the paper's Table 1 is: how often a sparse reward is found.

An evaluation is a set of jobs, each a number of episodes of one environment (for Meta-World: one
job per goal of the goal set). Jobs run as Ray tasks spread over the cluster's CPUs (`--local`:
one after another in this process); each builds its environments and the run's policy with the
builder (`make_runner`), loads the snapshot's acting weights, and plays its episodes with sampled
actions. The policy is the fine-tuning one with its reward gate closed: a random skill held for a
whole episode (or `--skill-every` steps).

An episode finds the sparse reward when one of its steps pays at least
`agent.choreographer.reward_gate` (1e-4): on the Jaco reach tasks the reported figure is the
fraction of episodes that found it; on a Meta-World goal set, the fraction of its 50 goals found in
any of their episodes (Meta-World's reward is its success flag).

Results: `zero_shot.jsonl` (one line per job: task, goal, returns, largest step rewards, found
flags) and `zero_shot.json` (the summary) in a run directory of their own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from choreo.launch.runtime.config import Config
from choreo.launch.runtime.jobs import run_jobs
from choreo.launch.runtime.rundir import RunDir
from choreo.launch.runtime.snapshot import Snapshot
from choreo.vocabulary import derive_seed

EVAL_ENVS = 10
"""Environments one job steps together (batched policy calls)."""
JOB_EPISODES = 20
"""Episodes per job when the task has no goals to split by: enough to amortise building the
environments, few enough to spread an evaluation over many workers."""


def plan_jobs(config: Config, episodes: int, goals: list[int] | None) -> list[tuple[Config, int]]:
    """(config, episodes) of every job: for Meta-World one per goal (each goal gets `episodes`),
    otherwise `episodes` split into jobs of at most JOB_EPISODES."""
    if config.env.task.startswith("mw_"):
        goals = list(range(50)) if goals is None else goals
        return [(dataclasses.replace(config, env=dataclasses.replace(config.env, goal_index=g)), episodes)
                for g in goals]
    sizes = [JOB_EPISODES] * (episodes // JOB_EPISODES) + ([episodes % JOB_EPISODES] if episodes % JOB_EPISODES else [])
    return [(config, n) for n in sizes]


def run_job(config: Config, weights: dict | None, episodes: int, index: int, behaviour: str) -> dict[str, Any]:
    """One job's episodes: the run's environments seeded for job `index`, the policy with
    `weights` (None: uniform random actions), sampled actions."""
    from choreo.launch.runtime.build import make_runner

    runner = make_runner(config, runner_id=index, seed=derive_seed(config.seed, "zero_shot"), behaviour=behaviour,
                         mode="sample", num_envs=min(episodes, EVAL_ENVS), random_steps=0, freeze_gc=False)
    try:
        if weights is not None:
            runner.set_weights(weights, 0)
        out = runner.evaluate(episodes)
    finally:
        runner.close()
    return {"goal": config.env.goal_index if config.env.task.startswith("mw_") else None, **out}


def summarise(task: str, jobs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Found fractions: of episodes, and (Meta-World) of goals found in any of their episodes."""
    found = [[r >= threshold for r in job["max_rewards"]] for job in jobs]
    episodes = sum(len(f) for f in found)
    summary: dict[str, Any] = {
        "task": task, "episodes": episodes, "threshold": threshold,
        "episodes_found": sum(sum(f) for f in found),
        "episode_success": sum(sum(f) for f in found) / episodes if episodes else 0.0,
        "mean_return": float(np.mean([r for job in jobs for r in job["returns"]])) if episodes else 0.0,
    }
    if task.startswith("mw_"):
        goals = {}
        for job, f in zip(jobs, found):
            goals[job["goal"]] = goals.get(job["goal"], False) or any(f)
        summary.update({"goals": len(goals), "goals_found": sum(goals.values()),
                        "goal_success": sum(goals.values()) / len(goals) if goals else 0.0,
                        "found_goals": sorted(g for g, ok in goals.items() if ok)})
    return summary


def evaluate(config: Config, run_dir: str | os.PathLike, episodes: int, behaviour: str,
             goals: list[int] | None = None, local: bool = False, address: str | None = None, stream=None,
             snapshot: Snapshot | None = None) -> dict[str, Any]:
    """Runs the jobs (on Ray unless `local`), writes the results into `run_dir`, returns the summary.
    snapshot: `config.snapshot` opened with `config`, when the caller has it already."""
    if behaviour == "random":
        weights, frames = None, 0
    else:
        snapshot = snapshot or Snapshot.open(config.snapshot, config=config)
        weights, frames = snapshot.policy_weights(), snapshot.frames
    jobs = plan_jobs(config, episodes, goals)
    start = time.monotonic()
    results = run_jobs(run_job, [(c, weights, n, i, behaviour) for i, (c, n) in enumerate(jobs)], local=local,
                       address=address, sizes=[n for _, n in jobs], label="choreo evaluate", stream=stream)
    seconds = time.monotonic() - start

    threshold = config.agent.choreographer.reward_gate
    records = [{"task": config.env.task, "policy": behaviour, "goal": r["goal"], "returns": r["returns"],
                "max_rewards": r["max_rewards"], "found": [m >= threshold for m in r["max_rewards"]]} for r in results]
    summary = {**summarise(config.env.task, results, threshold), "policy": "random" if behaviour == "random"
               else "skills", "snapshot": config.snapshot or None, "snapshot_frames": frames, "seconds": seconds}
    RunDir(run_dir).write_results("zero_shot", records, summary)
    return summary


def evaluate_command(args: Any) -> int:
    """`choreo evaluate --snapshot FILE task=TASK [--episodes N] [--skill-every N] [--policy random]`."""
    from choreo.launch.runtime.config import ConfigError, load_config

    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.policy == "skills" and not args.snapshot:
        raise ConfigError("choreo evaluate needs --snapshot FILE (a pretraining snapshot) to evaluate its skills, "
                          "or --policy random for the random-action baseline")
    overrides = ["mode=evaluate"] + ([] if args.episodes is None else [f"eval.episodes={args.episodes}"])
    if args.policy == "skills":
        overrides.append(f"snapshot={Path(args.snapshot).expanduser().resolve()}")
    if args.skill_every:
        overrides.append(f"agent.choreographer.random_skill_every={args.skill_every}")
    overrides += args.overrides
    config = load_config(args.preset, overrides, getattr(args, "config", None))
    goals = None
    if args.goals:
        try:
            goals = sorted({int(g) for g in args.goals.split(",")})
        except ValueError:
            raise ConfigError(f"--goals takes goal indices 0..49 separated by commas, got {args.goals!r}") from None
        if not config.env.task.startswith("mw_") or not all(0 <= g < 50 for g in goals):
            raise ConfigError(f"--goals {args.goals}: goal indices 0..49 of a Meta-World task (env.task=mw_reach)")
    if args.logdir:
        config = dataclasses.replace(config, logdir=args.logdir)
    behaviour = "random" if args.policy == "random" else "meta"
    snapshot = None
    if behaviour != "random":
        from choreo.learner.snapshot import SnapshotError

        try:
            snapshot = Snapshot.open(config.snapshot, config=config)
            snapshot.policy_weights()  # a snapshot that does not fit is refused before anything starts
        except SnapshotError as e:
            raise ConfigError(str(e)) from None
    run_dir = RunDir.create(config, args.logdir)
    print(f"run directory: {run_dir}")
    summary = evaluate(config, run_dir, config.eval.episodes, behaviour, goals, local=args.local, address=args.address,
                       snapshot=snapshot)
    what = "random actions" if behaviour == "random" else f"the skills of {config.snapshot}"
    line = (f"{config.env.task}, {what}: {summary['episodes_found']:,} of {summary['episodes']:,} episodes found "
            f"the sparse reward ({summary['episode_success']:.3f})")
    if "goals" in summary:
        line += f"; {summary['goals_found']} of {summary['goals']} goals found ({summary['goal_success']:.3f})"
    print(f"{line}; {summary['seconds']:.0f} s; results in {run_dir}")
    return 0
