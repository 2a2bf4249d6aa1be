"""`choreo evaluate`: the pretrained skills without updates (zero-shot), or uniform random actions
as the baseline, measured the way the paper's Table 1 is: how often a sparse reward is found.

An evaluation is a set of jobs, each a number of episodes of one environment (for Meta-World: one
job per goal of the goal set). Jobs run as Ray tasks spread over the cluster's CPUs (`--local`:
one after another in this process); each builds its environments and the run's policy with the
builder (`make_runner`), loads the snapshot's acting weights, and plays its episodes with sampled
actions. The policy is the fine-tuning one with its reward gate closed: a random skill held for a
whole episode, or `agent.choreographer.random_skill_every` steps (Meta-World: 50, the reference's
protocol, set by a rule of configs/suite/metaworld.yaml; `--skill-every` sets any other).

The protocol is the reference's (mazpie/choreographer's zero-shot evaluation): an episode
succeeds when its return exceeds the task's threshold (`success_threshold`: > 0 on Meta-World,
whose reward is the success flag summed over the action repeat; > 1e-4 on the Jaco reach tasks
and any other). The headline, `success`, is what the reference logs: on Meta-World the mean over
the goals of each goal's success rate (the fraction of its episodes that succeeded); elsewhere the
fraction of episodes that succeeded. Meta-World also reports the fraction of goals that succeeded
in any of their episodes (`goal_any_success`), a looser second figure.

Results: `zero_shot.jsonl` (one line per job: task, goal, returns, largest step rewards, success
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


SUCCESS_THRESHOLD = 1e-4
"""An episode of the Jaco reach tasks (and of any task but Meta-World) succeeds when its return
exceeds this: the reference's `episode_reward > 1e-4`. Jaco's reward is a smooth tolerance, small
but not zero far from the target, so the return, not a single step, is what crosses it."""
MW_SUCCESS_THRESHOLD = 0.0
"""A Meta-World episode succeeds when its return exceeds this (the reference's `episode_reward >
0`): its reward is the success flag, so when the hand was at the goal at any step."""


def success_threshold(task: str) -> float:
    """The return above which an episode of `task` succeeded (see the two thresholds above)."""
    return MW_SUCCESS_THRESHOLD if task.startswith("mw_") else SUCCESS_THRESHOLD


def summarise(task: str, jobs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The figures of the jobs' episodes: each succeeded when its return exceeds `threshold`.
    `success` (the headline): on Meta-World the mean over goals of each goal's success rate (a goal's
    episodes may span several jobs), else the fraction of episodes; `episode_success`: the fraction
    of episodes; Meta-World also `goal_success_rates` (goal -> rate), `goal_any_success` and
    `goals_found_any` (the goals that succeeded in any episode), `found_goals` (those goals)."""
    found = [[float(r) > threshold for r in job["returns"]] for job in jobs]
    episodes = sum(len(f) for f in found)
    episodes_found = sum(sum(f) for f in found)
    episode_success = episodes_found / episodes if episodes else 0.0
    returns = [r for job in jobs for r in job["returns"]]
    summary: dict[str, Any] = {
        "task": task, "success": episode_success, "success_metric": "fraction of episodes that succeeded",
        "success_rule": f"episode return > {threshold:g}", "threshold": threshold,
        "episodes": episodes, "episodes_found": episodes_found, "episode_success": episode_success,
        "mean_return": float(np.mean(returns)) if returns else 0.0,
    }
    if task.startswith("mw_"):
        by_goal: dict[int, list[bool]] = {}
        for job, f in zip(jobs, found):
            by_goal.setdefault(job["goal"], []).extend(f)
        rates = {g: sum(f) / len(f) for g, f in sorted(by_goal.items()) if f}
        found_goals = sorted(g for g, f in by_goal.items() if any(f))
        summary.update({"success": float(np.mean(list(rates.values()))) if rates else 0.0,
                        "success_metric": "mean over goals of each goal's success rate",
                        "goals": len(by_goal), "goal_success_rates": {str(g): r for g, r in rates.items()},
                        "goals_found_any": len(found_goals),
                        "goal_any_success": len(found_goals) / len(by_goal) if by_goal else 0.0,
                        "found_goals": found_goals})
    return summary


def summary_line(summary: dict[str, Any], what: str) -> str:
    """The printed result: the headline first, then (Meta-World) the goals found in any episode and
    the episodes. `what`: the policy evaluated ("random actions", "the skills of FILE")."""
    rule = f"a return > {summary['threshold']:g}"
    head = f"{summary['task']}, {what}: success {summary['success']:.3f}"
    episodes = f"{summary['episodes_found']:,} of {summary['episodes']:,} episodes"
    if "goals" not in summary:
        return f"{head} ({episodes} with {rule})"
    return (f"{head} (mean over {summary['goals']} goals of each goal's fraction of episodes with {rule}); "
            f"{summary['goals_found_any']} of {summary['goals']} goals found in any episode "
            f"({summary['goal_any_success']:.3f}); {episodes} ({summary['episode_success']:.3f})")


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

    threshold = success_threshold(config.env.task)
    records = [{"task": config.env.task, "policy": behaviour, "goal": r["goal"], "returns": r["returns"],
                "max_rewards": r["max_rewards"], "found": [float(x) > threshold for x in r["returns"]]}
               for r in results]
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
    print(f"{summary_line(summary, what)}; {summary['seconds']:.0f} s; results in {run_dir}")
    return 0
