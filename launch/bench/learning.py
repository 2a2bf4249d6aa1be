"""`choreo bench learning`: evidence that the system learns, at the `small` size, within a budget.

    choreo bench learning --quick                      # 60 minutes, into runs/bench-learning-<time>/
    choreo bench learning --quick --budget-minutes 180 --out learning-report
    choreo bench learning --budget-minutes 10 --stages resampling,planning
    choreo bench learning --threads 1 --quick          # while other processes share the cores
    choreo bench learning --stages finetune --snapshot A.pt --snapshot B.pt --seeds 3   # claim 4, hours

It runs the whole pipeline (pretraining, pictures, zero-shot evaluation, fine-tuning, planning) at
`configs/size/small.yaml` with fixed seeds, scaled to the budget, one run after another in this
process (`--local`), except the fine-tuning stage, which runs the paper's protocol outside the
budget unless `--quick` scales it down too; and writes `report.md` (tables, PNG plots made with matplotlib's Agg canvas,
the pictures of `choreo visualize`) and `results.json` (every number) into the output folder. The
claims, one stage each:

1. resampling  Code resampling keeps the codebook alive (the paper's Figure 7): two pretrainings
               on walker_stand from states, with and without resampling
               (`agent.choreographer.resample_codes=false`: the checks count the codes chosen
               since the previous one, and re-place none), the same frames; active codes over
               updates, from their TensorBoard scalars. Target: >= 95% of the codes active at the
               last check with resampling (chosen since the previous check, the reference's
               measure); the codes chosen per batch are given beside it.
2. diversity   The 64 skills of that snapshot, played in the real walker, against uniform random
               actions and the exploration policy: mean pairwise distance of the final torso
               (x, height), and (x, height) grid cells visited; and `choreo visualize`'s pictures.
               Target: the skills spread wider than random actions.
3. sparse      Sparse rewards found zero-shot (the paper's Table 1, `choreo evaluate`): a short
               pretraining on Meta-World reach and one on Jaco reach top-left (states), then the
               skills (the reference's protocol: Meta-World a random one every 50 steps, Jaco one an
               episode; success = return > 0 or > 1e-4) against random actions,
               on fewer goals and episodes than the paper. Target: the skills find the reward at
               least as often as random actions, on each task.
4. finetune    Fine-tuning a walker snapshot beats learning from scratch (`choreo finetune`,
               `--from-scratch`) on walker_stand, at the paper's protocol (100k frames, an
               evaluation of 10 episodes every 10k; `--quick`: runs scaled to the budget), over
               seeds (`--seeds`) and snapshots (`--snapshot`, repeatable; default stage 1's), with
               a control whose executor is frozen (`agent.finetune.freeze_skills=true`). Beside
               the curves, on each snapshot: every skill held for one episode, the best 5 of
               those measured again on fresh episodes, random actions; the skills the
               meta-controller chose in each evaluation episode (eval.jsonl's `skill_counts`)
               against the held ones; the fine-tuned skill actors held as the snapshot's were
               (executor drift); a reading of what the figures point to. Target, two lines:
               fine-tuned above scratch by more than two standard errors of the difference over
               the second half of the budget and at the last evaluation; fine-tuned at least as
               good as the best held skill measured again.
5. planning    Zero-shot planning on point_mass_nav (`choreo plan`): DADS planning with its skill
               dynamics, and planning over Choreographer's codebook with its world model, each
               against random skills. Target: a lower normalised distance than random skills by
               more than two standard errors of the difference.

Budget: after a short calibration (the learner's update of each kind timed on random batches),
each stage gets a fraction of the time left (`FRACTIONS`: 36%, 4%, 16%, 30%, 14%, re-planned over
the remaining stages whenever one starts, so time a stage leaves unused goes to the later ones).
Within a stage: resampling, half per run; diversity, 60% rollouts and 30% pictures; sparse, 40%
per pretraining and 20% for the evaluations; fine-tuning (`--quick`), the held-skill episodes
first, then an equal share per run, evaluations included; planning, 15% DADS, 65% Choreographer,
20% the four planning evaluations. Without `--quick` the fine-tuning stage takes no share: its
runs are the preset's own, and the time it takes is added to the budget, so that the stages after
it keep theirs. A run is sized
from the measured update cost: frames = warm-up + updates x the steps an update stands for at the
preset's replay ratio (the preset's warm-up, `replay.min_size`, unless the run cannot afford as
many steps after it). A run that overruns its plan by half is stopped like Ctrl-C (final
checkpoint; pretraining: its snapshot taken from that checkpoint) and reported as cut short,
with the machine's load average. A stage that fails is recorded with its error, and the others go
on; results.json and report.md are rewritten after every stage.

Where the runs execute: every run `--local`, one after another in this process; the fine-tuning
runs `--parallel` at a time where the cores allow (one per CORES_PER_RUN cores by default), each
then a job of the job runner in a process of its own. Measured here (2 cores, a 5,000-frame
small-size walker pretraining, 4,000 of them warm-up): 2 min 13 s in this process against 7 min
30 s on the embedded Ray, where the two environment workers, the shard and the learner share the
2 cores and the learner is the slow side (0.9 against 0.2 updates/s). The process is warmed up
once (a learner's first updates take seconds), which the calibration pays for.

`write_report(results, out)` makes report.md and the plots from a results dict alone (no
training), so a recorded results.json can be rendered again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRESET = "small"
"""The size every run takes (configs/size/small.yaml)."""
SEED = 0
"""Seed of every pretraining, evaluation and rollout."""
FINETUNE_SEEDS = (0, 1, 2)
FRACTIONS = {"resampling": 0.36, "diversity": 0.04, "sparse": 0.16, "finetune": 0.30, "planning": 0.14}
"""Share of the budget of each stage, in the order they run."""
STAGES = tuple(FRACTIONS)
TITLES = {
    "resampling": "Code resampling keeps the codebook alive",
    "diversity": "The skills spread wider than random actions",
    "sparse": "Sparse rewards found zero-shot",
    "finetune": "Fine-tuning beats learning from scratch",
    "planning": "Zero-shot planning on point-mass navigation",
}
DEFAULT_MINUTES = 60.0
REPORT_RESERVE_S = 5.0
"""Seconds kept back for writing the report."""

WALKER = ["env.task=walker_stand"]
SPARSE_TASKS = {
    # Meta-World reach from states, at its default action repeat (2: 250 agent steps an episode)
    "mw_reach": ["env.task=mw_reach", "env.action_repeat=2"],
    "jaco_reach_top_left": ["env.task=jaco_reach_top_left"],
}
SKILL_EVERY = 50
"""Meta-World's zero-shot evaluation draws a new random skill every this many steps, the reference's
protocol (stated here: the stage runs Meta-World from states, so the Meta-World suite's rule does
not apply); Jaco holds one skill for the whole episode, the evaluation's default."""
MW_GOAL_SET = 1
DADS = ["algo=dads", "env.task=point_mass_nav", "agent.dads.hidden=128", "agent.dads.prior_samples=32"]
"""DADS on the point mass as measured by hand (docs/dads-and-planning.md) (a minute of pretraining plans well)."""
CHOREO_NAV = ["env.task=point_mass_nav"]
CODEBOOK_PLANNER = ["agent.planner.candidates=64"]
"""Planning over 64 codes with H_P = 1: K >= the number of codes tries every code."""
NO_PICTURES = ["monitor.media_every=0"]
"""The runs write no TensorBoard pictures (they cost seconds each); stage 2 draws them once."""

# Cost model of a run (seconds); the learner's update is measured, the rest are estimates of this
# machine's (2 cores) that only decide how many frames a run gets: the watchdog catches the rest.
RUN_OVERHEAD_S = 6.0
"""Building the environments and the agent, the TensorBoard writer, the final checkpoint."""
STEP_S = {"walker": 0.0015, "mw": 0.0015, "jaco": 0.002, "point": 0.001}
"""Seconds per agent step of acting in the loop (policy call for one environment, the step, replay)."""
EVAL_STEP_S = 0.002
"""Seconds per batched policy call of an evaluation (plus the environments' steps)."""
MIN_UPDATES = 10
WALKER_EPISODE = 1000
"""Agent steps of a walker episode (an evaluation's length)."""
WATCHDOG_FACTOR, WATCHDOG_SLACK_S = 1.5, 30.0
"""A run is stopped after max(factor x its planned seconds, planned + slack)."""
PROTOCOL_WATCHDOG_FACTOR = 3.0
"""The same for the fine-tuning protocol's runs, whose length is fixed: only a run that hangs is stopped."""
CORES_PER_RUN = 2
"""Cores a fine-tuning run `--local` keeps busy (its environment steps, its learner's torch threads):
`--parallel`'s default is the cores over this, so a 2-core machine runs one at a time in this process."""

# Skill diversity: a grid over the walker torso's x position and height.
CELL_X, CELL_Z = 0.25, 0.1
DIVERSITY_STEP_S = 0.02
"""Seconds per step of 64 walker environments acted on with one batched call."""
RENDER_S = 0.012
"""Seconds per rendered 64x64 walker frame of `choreo visualize` (with its policy calls and GIF encoding)."""


# ============================================================================ budget and cost model


@dataclasses.dataclass
class RunPlan:
    """How long one training run is: agent steps, warm-up steps before the first update, updates,
    and the estimated seconds."""

    steps: int
    warm: int
    updates: int
    action_repeat: int
    seconds: float
    steps_per_update: float = 10.0
    """Agent steps inserted per update at the replay ratio (batch steps / samples per insert)."""
    eval_every: int = 0
    """Frames between evaluations (fine-tuning), 0: none."""
    eval_episodes: int = 0

    @property
    def frames(self) -> int:
        return self.steps * self.action_repeat


def plan_run(seconds: float, update_s: float, steps_per_update: float, default_warm: int, min_warm: int,
             step_s: float, action_repeat: int = 1, fixed_s: float = RUN_OVERHEAD_S,
             min_updates: int = MIN_UPDATES) -> RunPlan:
    """The run that fits `seconds`: the default warm-up (`replay.min_size` frames, in agent steps) when the run
    can afford at least as many steps of training after it, else a shorter one (never below
    `min_warm`); then as many updates as fit, one per `steps_per_update` agent steps."""
    per_update = update_s + steps_per_update * step_s

    def updates_after(warm: int) -> int:
        return int((seconds - fixed_s - warm * step_s) / per_update)

    warm = default_warm
    if updates_after(warm) * steps_per_update < warm:
        warm = int(max(min_warm, min(default_warm, updates_after(min_warm) * steps_per_update)))
    updates = max(min_updates, updates_after(warm))
    steps = warm + int(math.ceil(updates * steps_per_update))
    return RunPlan(steps, warm, updates, action_repeat, fixed_s + steps * step_s + updates * update_s, steps_per_update)


class Budget:
    """The bench's clock: the budget, what has been used, and each stage's share of what is left."""

    def __init__(self, seconds: float, fractions: dict[str, float], clock: Callable[[], float] = time.monotonic):
        self.seconds, self.fractions, self.clock = seconds, dict(fractions), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allot(self, stage: str, remaining: Sequence[str]) -> float:
        """Seconds for `stage` now: the time left, less the report's reserve, shared among the
        stages still to run (`remaining`, `stage` first) in proportion to their fractions."""
        share = self.fractions[stage] / max(sum(self.fractions[s] for s in remaining), 1e-9)
        return max(self.left() - REPORT_RESERVE_S, 0.0) * share


@dataclasses.dataclass
class Costs:
    """Seconds per learner update of each kind of run on this machine: measured by `calibrate`,
    then corrected by what the runs actually took."""

    pretrain: float
    finetune: float
    dads: float
    calibration_s: float = 0.0

    def observe(self, kind: str, seconds: float, plan: RunPlan) -> None:
        """A run of `kind` took `seconds` for `plan`: re-estimate its update cost as half the old
        estimate and half the new one (the new one within 1/2x and 3x of the old: a run slowed down
        by another process's burst should not shrink every later run). Runs whose updates were
        less than half of their plan (short ones, mostly start-up and warm-up) are not counted."""
        old = getattr(self, kind)
        if plan.updates * old < 0.5 * plan.seconds:
            return
        others = plan.seconds - plan.updates * old  # what the plan counted besides the updates
        measured = (seconds - others) / max(plan.updates, 1)
        setattr(self, kind, 0.5 * old + 0.5 * float(np.clip(measured, 0.5 * old, 3.0 * old)))


def calibrate(timed: int = 3, common: Sequence[str] = ()) -> Costs:
    """Times the learner's updates on random batches of the runs' shapes: a Choreographer
    pretraining and fine-tuning update (walker; the median of `timed`), a DADS update (the point
    mass; the mean over a whole cycle of its q steps). The first updates of a process can take
    seconds; they are paid for here, untimed. `common`: overrides of every run."""
    import torch

    from choreo.launch.runtime.build import random_batch
    from choreo.launch.runtime.build import env_shapes, make_agent
    from choreo.launch.runtime.config import load_config

    start = time.perf_counter()
    rng = np.random.default_rng(SEED)

    def timed_updates(agent: Any, batch: dict, warm: int, n: int) -> float:
        """The median of `n` timed updates after `warm` untimed ones: another process's burst on
        the shared cores moves a mean, hardly a median."""
        for _ in range(warm):
            agent.update(batch)
        times = []
        for _ in range(n):
            begin = time.perf_counter()
            agent.update(batch)
            times.append(time.perf_counter() - begin)
        return float(np.median(times)) if times else 0.0

    config = load_config([PRESET], [*WALKER, *common])
    previous = torch.get_num_threads()
    torch.set_num_threads(config.learner.threads or os.cpu_count() or 1)
    try:
        obs_shape, action_dim = env_shapes(config)
        rb = config.replay
        agent = make_agent(config, obs_shape, action_dim)
        batch = random_batch(rng, obs_shape, rb.batch_size, rb.batch_length, action_dim=action_dim)
        pretrain = timed_updates(agent, batch, 2, timed)
        agent.finetune_mode()
        batch = random_batch(rng, obs_shape, rb.batch_size, rb.batch_length, reward_scale=1.0, action_dim=action_dim)
        finetune = timed_updates(agent, batch, 1, timed)
        dads_config = load_config([PRESET], [*DADS, *common])
        obs_shape, action_dim = env_shapes(dads_config)
        rb = dads_config.replay
        agent = make_agent(dads_config, obs_shape, action_dim)
        batch = random_batch(rng, obs_shape, rb.batch_size, rb.batch_length, action_dim=action_dim,
                             skill_dim=dads_config.agent.dads.skill_dim)
        cycle = dads_config.agent.dads.dynamics_every  # q trains on every cycle-th update: time whole cycles
        timed_updates(agent, batch, 2, 0)
        per_cycle = []
        for _ in range(2):
            begin = time.perf_counter()
            for _ in range(cycle):
                agent.update(batch)
            per_cycle.append((time.perf_counter() - begin) / cycle)
        dads = min(per_cycle)
    finally:
        torch.set_num_threads(previous)
    return Costs(pretrain, finetune, dads, time.perf_counter() - start)


# ============================================================================ the bench


class StageSkipped(Exception):
    """A stage that cannot run (what it needs is missing); the message says why."""


class Watchdog:
    """Stops a run that overruns: after `seconds`, KeyboardInterrupt in the main thread (as Ctrl-C
    does: the run writes its final checkpoint and returns). Only in the main thread (SIGALRM)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.fired, self.armed = seconds, False, False
        self._previous: Any = None

    def _fire(self, signum: int, frame: Any) -> None:
        self.fired = True
        raise KeyboardInterrupt

    def __enter__(self) -> Watchdog:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            self._previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1.0))
            self.armed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)


def stop_on_signals() -> contextlib.AbstractContextManager:
    """SIGTERM and SIGINT raise KeyboardInterrupt, as in `choreo pretrain` (launch/runtime/run.py);
    signal handlers can only be set in the main thread, elsewhere nothing changes."""
    from choreo.launch.runtime.signals import signals_stop_the_run

    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return signals_stop_the_run()


class Heartbeat:
    """A line every `every` seconds while a long step runs: what it is, how long it has taken of
    its plan."""

    def __init__(self, say: Callable[[str], None], what: str, planned: float, every: float = 60.0) -> None:
        self.say, self.what, self.planned, self.every = say, what, planned, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.every):
            self.say(f"  ... {self.what}: {fmt_s(time.monotonic() - start)} of ~{fmt_s(self.planned)} planned")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def watchdog_limit(planned: float, factor: float = WATCHDOG_FACTOR) -> float:
    return max(factor * planned, planned + WATCHDOG_SLACK_S)


def execute_run(config: Any, logdir: str, log: str, limit_s: float) -> dict[str, Any]:
    """One run of `config` in this process (`--local`), in a new run directory under `logdir`, its
    output appended to `log`, stopped like Ctrl-C after `limit_s` seconds (final checkpoint).
    Returns {"rc", "run_dir", "seconds", "cut"}. The user's Ctrl-C (or a SIGTERM) is raised again."""
    from choreo.launch.runtime.local import run_local
    from choreo.launch.runtime.rundir import RunDir

    start = time.monotonic()
    run_dir = None
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), \
            Watchdog(limit_s) as dog:
        try:
            run_dir = RunDir.create(config, logdir)
            with stop_on_signals():
                rc = run_local(config, run_dir.path)
        except KeyboardInterrupt:
            if not dog.fired:
                raise
            rc = 130
    if rc == 130 and not dog.fired:
        raise KeyboardInterrupt  # the user's Ctrl-C or a SIGTERM: the bench stops
    return {"rc": rc, "run_dir": None if run_dir is None else str(run_dir.path),
            "seconds": time.monotonic() - start, "cut": dog.fired}


def execute_job(config: Any, logdir: str, log: str, limit_s: float) -> dict[str, Any]:
    """`execute_run` as a job of `run_jobs` in a process of its own: its failure comes back as
    {"error": ...}, so that the runs beside it keep their results."""
    try:
        return execute_run(config, logdir, log, limit_s)
    except Exception as e:  # noqa: BLE001 - reported by the bench with the run's name and log
        return {"error": f"{type(e).__name__}: {e}"}


def default_parallel(cpus: int | None = None) -> int:
    """Fine-tuning runs at once by default: one per CORES_PER_RUN cores, at least one."""
    return max(1, (cpus or os.cpu_count() or 1) // CORES_PER_RUN)


class Bench:
    def __init__(self, out: Path, budget: Budget, stream: Any, stages: Sequence[str], threads: int = 0,
                 quick: bool = False, seeds: int = len(FINETUNE_SEEDS), parallel: int = 0) -> None:
        self.out, self.budget, self.stream, self.stages = out, budget, stream, list(stages)
        self.threads = threads or os.cpu_count() or 1
        """Torch threads of every run's learner and of this process's acting (`--threads`)."""
        self.common = [f"learner.threads={self.threads}"]
        """Overrides of every run's config."""
        self.runs, self.logs = out / "runs", out / "logs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.costs: Costs | None = None
        self.walker_snapshot: Path | None = None
        """Stage 1's snapshot (with resampling), or the first `--snapshot`: what stage 2 plays."""
        self.snapshots: list[Path] = []
        """The `--snapshot` files stage 4 fine-tunes (none: stage 1's)."""
        self.quick = quick
        """Stage 4 at a size scaled to the budget (`--quick`) instead of the paper's protocol."""
        self.seeds = seeds
        """Fine-tuning seeds 0 .. seeds - 1 (`--seeds`)."""
        self.parallel = parallel or default_parallel()
        """Fine-tuning runs at once (`--parallel`); 1: one after another in this process."""
        self.outside: list[str] = []
        """Stages of a fixed size (the fine-tuning protocol): their time is added to the budget."""
        self.stage = ""
        self.stage_start = time.monotonic()
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ output

    def say(self, message: str) -> None:
        left = self.budget.left()
        clock = (f"{fmt_s(self.budget.elapsed())} of {fmt_s(self.budget.seconds)}, "
                 + (f"~{fmt_s(left)} left" if left >= 0 else f"{fmt_s(-left)} over budget"))
        print(f"[bench learning {clock}] {message}", file=self.stream, flush=True)

    def save(self) -> None:
        self.results["elapsed_s"] = self.budget.elapsed()
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        os.replace(tmp, self.out / "results.json")
        write_report(self.results, self.out)

    @contextlib.contextmanager
    def logged(self, name: str) -> Iterator[Any]:
        """stdout and stderr of what runs inside into logs/<name>.log (the runs' progress lines)."""
        path = self.logs / f"{name}.log"
        with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield f

    def rel(self, path: Path | str | None) -> str | None:
        if path is None:
            return None
        try:
            return str(Path(path).resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------ training runs

    def base_config(self, overrides: Sequence[str]) -> Any:
        from choreo.launch.runtime.config import load_config

        return load_config([PRESET], [*self.common, *overrides])

    def plan(self, kind: str, overrides: Sequence[str], seconds: float, step_s: float) -> RunPlan:
        """The run of `kind` ("pretrain", "finetune", "dads") on `overrides` that fits `seconds`."""
        from choreo.launch.runtime.config import warmup_steps

        config = self.base_config(overrides)
        rb = config.replay
        steps_per_update = rb.batch_size * rb.batch_length / rb.samples_per_insert
        min_warm = max(300, 10 * rb.batch_length)
        return plan_run(seconds, getattr(self.costs, kind), steps_per_update, warmup_steps(config), min_warm, step_s,
                        config.env.action_repeat)

    def run_config(self, name: str, kind: str, overrides: Sequence[str], plan: RunPlan, logdir: Path,
                   extra: Sequence[str] = (), sized: bool = True) -> Any:
        """The config of one run of `plan` in `<logdir>/<name>/`; `sized`: its length, warm-up and
        evaluations from `plan` (else the preset's own, the paper's fine-tuning protocol)."""
        ar = plan.action_repeat
        resized = []
        if sized:
            resized = [f"learner.total_frames={plan.frames}", f"replay.min_size={plan.warm * ar}",
                       f"replay.capacity={max(plan.steps, 1000)}"]
            if kind == "pretrain":
                resized += [f"learner.seed_frames={plan.warm * ar}", f"learner.snapshot_frames=[{plan.frames}]"]
            elif kind == "dads":
                resized += [f"learner.snapshot_frames=[{plan.frames}]"]
            else:
                resized += [f"eval.every_frames={plan.eval_every}", f"eval.episodes={plan.eval_episodes}"]
        return self.base_config([*overrides, *resized, *NO_PICTURES, *extra, f"logdir={logdir}", f"run_name={name}"])

    def train(self, name: str, kind: str, overrides: Sequence[str], plan: RunPlan, step_s: float,
              logdir: Path | None = None, extra: Sequence[str] = (), sized: bool = True,
              watchdog: float = WATCHDOG_FACTOR) -> dict[str, Any]:
        """One run of `plan` (`choreo pretrain` or `choreo finetune`, `--local`) in
        `<logdir>/<name>/`, its output in logs/<name>.log. Returns what it did: frames, updates,
        seconds, its snapshot (a fine-tuning run's: its final checkpoint's agent), whether the
        watchdog cut it short."""
        from choreo.launch.runtime.plan import resolve_plan
        from choreo.launch.runtime.run import check_snapshot

        logdir = logdir or self.runs
        config = self.run_config(name, kind, overrides, plan, logdir, extra, sized)
        if resolve_plan(config).start == "snapshot":
            check_snapshot(config)
        self.announce(name, plan)
        with Heartbeat(self.say, name, plan.seconds):
            done = execute_run(config, str(logdir), str(self.logs / f"{name}.log"),
                               watchdog_limit(plan.seconds, watchdog))
        return self.finish_run(name, kind, config, plan, done)

    def announce(self, name: str, plan: RunPlan) -> None:
        ar = plan.action_repeat
        self.say(f"{self.stage}: {name}: {plan.frames:,} frames ({plan.warm * ar:,} warm-up), ~{plan.updates:,} "
                 f"updates, ~{fmt_s(plan.seconds)}")

    def finish_run(self, name: str, kind: str, config: Any, plan: RunPlan, done: dict[str, Any],
                   observe: bool = True) -> dict[str, Any]:
        """What `execute_run` left of run `name`: its counters from the final checkpoint, its
        snapshot (the last one it wrote, else one made from that checkpoint), the update cost
        observed (`observe`, unless the watchdog cut it short)."""
        from choreo.launch.runtime.rundir import RunDir
        from choreo.learner.learner import load_torch_file
        from choreo.learner.snapshot import save_snapshot

        log = self.rel(self.logs / f"{name}.log")
        if done.get("error"):
            raise RuntimeError(f"run {name} failed: {done['error']}; see {log}")
        rc, seconds, cut = done["rc"], done["seconds"], done["cut"]
        if rc not in (0, 130):
            raise RuntimeError(f"run {name} ended with exit code {rc}; see {log}")
        run_dir = RunDir(done["run_dir"]) if done.get("run_dir") else None
        if run_dir is None or not run_dir.checkpoint.is_file():
            raise RuntimeError(f"run {name} was stopped after {fmt_s(seconds)} before it wrote a checkpoint")
        state = load_torch_file(run_dir.checkpoint)
        frames, updates = int(state["counters"]["frames"]), int(state["updates"])
        snapshots = run_dir.snapshot_files()
        if snapshots:
            snapshot = snapshots[-1]
        else:  # cut short before its last frame, or a fine-tuning run: its final checkpoint is the snapshot
            snapshot = save_snapshot(run_dir.snapshot(frames), state["agent"], config, frames, updates)
        if observe and not cut:  # a run cut short says nothing reliable about the update's cost
            self.costs.observe(kind, seconds, plan)
        self.say(f"{self.stage}: {name}: {'cut short by the watchdog at' if cut else 'done,'} {frames:,} frames, "
                 f"{updates:,} updates in {fmt_s(seconds)} (load average {os.getloadavg()[0]:.1f})")
        return {"name": name, "run_dir": self.rel(run_dir.path), "frames": frames, "planned_frames": plan.frames,
                "load_1m": os.getloadavg()[0],
                "warm_frames": plan.warm * plan.action_repeat, "updates": updates, "seconds": seconds,
                "planned_seconds": plan.seconds, "cut_short": cut, "snapshot": self.rel(snapshot),
                "log": log}

    def train_runs(self, specs: Sequence[RunSpec], plan: RunPlan, logdir: Path, parallel: int, sized: bool,
                   watchdog: float, finished: Callable[[RunSpec, dict[str, Any] | None, BaseException | None], None]
                   ) -> None:
        """The fine-tuning runs `specs` of `plan`: one after another in this process (`parallel` 1),
        or `parallel` at a time, each a job of `run_jobs` in a process of its own (an embedded Ray),
        its learner on the cores over `parallel` torch threads. `finished(spec, run, error)` after
        each (for jobs, after each batch of `parallel`): a run that failed does not stop the others."""
        from choreo.launch.runtime.jobs import run_jobs
        from choreo.launch.runtime.plan import resolve_plan
        from choreo.launch.runtime.run import check_snapshot

        step_s = STEP_S["walker"]
        if parallel <= 1:
            for spec in specs:
                try:
                    run = self.train(spec.name, "finetune", spec.overrides, plan, step_s, logdir=logdir, sized=sized,
                                     watchdog=watchdog)
                except Exception as e:  # noqa: BLE001 - recorded with the run; the others go on
                    finished(spec, None, e)
                else:
                    finished(spec, run, None)
            return
        threads = max(1, self.threads // parallel)
        limit = watchdog_limit(plan.seconds, watchdog)
        for i in range(0, len(specs), parallel):
            batch, calls = [], []
            for spec in specs[i:i + parallel]:
                config = self.run_config(spec.name, "finetune", spec.overrides, plan, logdir,
                                         [f"learner.threads={threads}"], sized)
                try:
                    if resolve_plan(config).start == "snapshot":
                        check_snapshot(config)
                except Exception as e:  # noqa: BLE001 - as above
                    finished(spec, None, e)
                    continue
                self.announce(spec.name, plan)
                batch.append((spec, config))
                calls.append((config, str(logdir), str(self.logs / f"{spec.name}.log"), limit))
            if not calls:
                continue
            with Heartbeat(self.say, f"{len(calls)} runs at once", plan.seconds):
                done = run_jobs(execute_job, calls, local=False, cpus=threads, unit="runs",
                                label="bench learning: fine-tuning", stream=self.stream)
            for (spec, config), result in zip(batch, done):
                try:
                    run = self.finish_run(spec.name, "finetune", config, plan, result, observe=False)
                except Exception as e:  # noqa: BLE001 - as above
                    finished(spec, None, e)
                else:
                    finished(spec, run, None)

    # ------------------------------------------------------------------ stages

    def run_stage(self, stage: str, index: int) -> None:
        """Runs `stage` into its section of the results (filled in place, so that what a failing
        stage measured before it failed is kept), judges its target whatever happened, saves."""
        remaining = [s for s in self.stages if STAGES.index(s) >= STAGES.index(stage)]
        allot = self.budget.allot(stage, remaining)
        self.stage = f"stage {index}/{len(self.stages)} {stage}"
        self.stage_start = time.monotonic()
        self.say(f"{self.stage}: {TITLES[stage]} "
                 + ("(the paper's protocol, outside the budget)" if stage in self.outside else
                    f"(allotted {fmt_s(allot)})"))
        section: dict[str, Any] = {"title": TITLES[stage], "allotted_s": allot, "status": "running"}
        self.results["stages"][stage] = section
        try:
            STAGE_FUNCTIONS[stage](self, allot, section)
            if section["status"] == "running":
                section["status"] = "ok"
        except StageSkipped as e:
            section.update(status="skipped", error=str(e))
        except KeyboardInterrupt:
            section.update(status="interrupted", error="interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as e:  # noqa: BLE001 - a stage's failure must not lose the others
            _record_failure(section, e)
        finally:
            with contextlib.suppress(Exception):
                section["target"] = JUDGES[stage](section)
            section["seconds"] = time.monotonic() - self.stage_start
            self.results["budget"]["stages"][stage] = {"allotted_s": allot, "used_s": section["seconds"]}
            if stage in self.outside:  # the later stages keep the time they were planned with
                self.budget.seconds += section["seconds"]
            self.results["estimates"] = _costs_dict(self.costs)
            self.save()
        verdict = section.get("target", {}).get("met")
        self.say(f"{self.stage}: {section['status']}" + (f" ({section['error']})" if section.get("error") else "")
                 + ("" if verdict is None else f"; target {'met' if verdict else 'missed'}")
                 + f"; took {fmt_s(section['seconds'])}")


def _record_failure(entry: dict[str, Any], e: BaseException) -> None:
    entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))


@contextlib.contextmanager
def _part(b: Bench, entry: dict[str, Any]) -> Iterator[None]:
    """One independent part of a stage (a task, an agent): its status is ok once the body ran, or
    failed with the error, and the other parts still run; the results are saved either way."""
    try:
        yield
        entry["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the other parts still run
        _record_failure(entry, e)
    b.save()


def _finish_parts(section: dict[str, Any], parts: dict[str, dict[str, Any]]) -> None:
    """A stage of independent parts (tasks, agents): ok, partial or failed, and the errors."""
    statuses = {p.get("status") for p in parts.values()}
    if statuses == {"ok"}:
        section["status"] = "ok"
        return
    section["status"] = "partial" if "ok" in statuses else "failed"
    section["error"] = "; ".join(f"{name}: {p.get('error')}" for name, p in parts.items() if p.get("status") != "ok")


def _all_met(verdicts: dict[str, bool | None]) -> bool | None:
    """False when any part missed, True when every part met, None otherwise (a part unmeasured)."""
    if any(v is False for v in verdicts.values()):
        return False
    return True if verdicts and all(v is True for v in verdicts.values()) else None


def _costs_dict(costs: Costs | None) -> dict[str, float]:
    if costs is None:
        return {}
    return {"pretrain_update_s": costs.pretrain, "finetune_update_s": costs.finetune,
            "dads_update_s": costs.dads, "seconds": costs.calibration_s}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------- 1. code resampling


RESAMPLING_TAGS = ("codebook/active_codes", "codebook/window_active_codes", "codebook/resampled_codes", "codebook/recon")
LOG_POINTS = 40
"""Logged points aimed at per curve of stage 1."""


def log_every_for(updates: int, resample_every: int, points: int = LOG_POINTS) -> int:
    """How often a run logs its metrics: about `points` times, at a divisor of `resample_every`
    (so that every resampling check is a logged step)."""
    divisors = [d for d in range(1, max(resample_every, 1) + 1) if resample_every % d == 0] or [1]
    fit = [d for d in divisors if d <= max(1, updates // points)]
    return max(fit) if fit else 1


def read_curves(run_dir: Path, tags: Sequence[str], log_every: int) -> dict[str, list[list[float]]]:
    """The TensorBoard scalars `tags` of a local run as [[updates, value], ...]: the learner's
    metrics are written every `log_every` updates, so the k-th point is update k x log_every."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from choreo.launch.runtime.rundir import RunDir

    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    present = set(events.Tags().get("scalars", []))
    return {tag: [[(i + 1) * log_every, float(e.value)] for i, e in enumerate(events.Scalars(tag))]
            for tag in tags if tag in present}


def curve_end(curve: Sequence[Sequence[float]], last: int = 5) -> float | None:
    """The mean of the last `last` values of a curve (None when it is empty)."""
    if not curve:
        return None
    return float(np.mean([v for _, v in curve[-last:]]))


def stage_resampling(b: Bench, allot: float, section: dict[str, Any]) -> None:
    step_s = STEP_S["walker"]
    plan = b.plan("pretrain", WALKER, allot / 2, step_s)
    config = b.base_config(WALKER)
    codes, every = config.agent.choreographer.num_codes, config.agent.choreographer.resample_every
    log_every = log_every_for(plan.updates, every)
    section["scale"] = {"task": "walker_stand", "obs": "states", "planned_frames": plan.frames,
                        "warm_frames": plan.warm * plan.action_repeat, "num_codes": codes, "resample_every": every,
                        "log_every": log_every, "seed": SEED, "preset": PRESET}
    runs = section["runs"] = {}
    runs["with"] = b.train("walker_stand-resampling", "pretrain", WALKER, plan, step_s,
                           extra=[f"learner.log_every={log_every}"])
    b.walker_snapshot = b.out / runs["with"]["snapshot"]
    finish_resampling_run(b, runs["with"], log_every, every)
    b.save()
    # The frames the first run reached (its plan's, unless the watchdog cut it short), without
    # resampling, unless the time left says otherwise.
    left = allot - (time.monotonic() - b.stage_start)
    reached = runs["with"]["frames"] // plan.action_repeat
    off_plan = dataclasses.replace(plan, steps=reached, updates=max(int((reached - plan.warm) / plan.steps_per_update),
                                                                     MIN_UPDATES),
                                   seconds=runs["with"]["seconds"])
    if runs["with"]["seconds"] > 1.2 * left:
        off_plan = b.plan("pretrain", WALKER, max(left, 0.0), step_s)
        section.setdefault("notes", []).append(
            f"the run without resampling got {off_plan.frames:,} frames, not the {runs['with']['frames']:,} of the "
            f"run with it: the time left after the first run ({fmt_s(left)}) did not allow as many")
    runs["without"] = b.train("walker_stand-no-resampling", "pretrain", WALKER, off_plan, step_s,
                              extra=[f"learner.log_every={log_every}", "agent.choreographer.resample_codes=false"])
    finish_resampling_run(b, runs["without"], log_every, every)


def finish_resampling_run(b: Bench, run: dict[str, Any], log_every: int, every: int) -> None:
    """A run's curves from its TensorBoard events, and its values at the end."""
    curves = run["curves"] = read_curves(b.out / run["run_dir"], RESAMPLING_TAGS, log_every)
    windows = curves.get("codebook/window_active_codes", [])
    checks = [v for u, v in windows if every and u % every == 0]
    run["final"] = {"active_codes": curve_end(curves.get("codebook/active_codes", [])),
                    "window_active_codes": checks[-1] if checks else curve_end(windows, 1),
                    "resampled_codes": float(sum(v for _, v in curves.get("codebook/resampled_codes", []))),
                    "recon": curve_end(curves.get("codebook/recon", []))}


def judge_resampling(section: dict[str, Any], share: float = 0.95) -> dict[str, Any]:
    """Active as the reference counts it for resampling (and the paper's Figure 7): a code is
    active when a state of the batches since the previous check chose it. The stricter count of
    codes chosen within one batch is given beside it, with and without resampling."""
    codes, every = section["scale"]["num_codes"], section["scale"].get("resample_every")
    final = section.get("runs", {}).get("with", {}).get("final", {})
    window = final.get("window_active_codes")
    off = section.get("runs", {}).get("without", {}).get("final", {})
    return {"text": f">= {share:.0%} of the {codes} codes active at the last resampling check with resampling "
                    f"(>= {share * codes:.1f} codes chosen by the states of the {every} batches since the "
                    f"previous check, the reference's measure)",
            "threshold": share * codes, "measured": window,
            "per_batch": final.get("active_codes"), "per_batch_without": off.get("active_codes"),
            "without": off.get("active_codes"),
            "met": None if window is None else bool(window >= share * codes)}


# ---------------------------------------------------------------------------- 2. skill diversity


def spread(positions: np.ndarray) -> dict[str, Any]:
    """Diversity of walker rollouts: positions `[N, T + 1, 2]` (torso x, torso height) ->
    the mean pairwise distance of the final positions, the cells of a (CELL_X x CELL_Z) grid
    visited over all steps and at the end, and the final positions' spread."""
    final = positions[:, -1]
    n = len(final)
    diffs = np.linalg.norm(final[:, None] - final[None], axis=-1)
    mean_pairwise = float(diffs[np.triu_indices(n, 1)].mean()) if n > 1 else 0.0
    cells = np.floor(positions.reshape(-1, 2) / [CELL_X, CELL_Z]).astype(np.int64)
    final_cells = np.floor(final / [CELL_X, CELL_Z]).astype(np.int64)
    return {"mean_pairwise_distance": mean_pairwise, "cells": int(len(np.unique(cells, axis=0))),
            "final_cells": int(len(np.unique(final_cells, axis=0))),
            "final_x_mean": float(final[:, 0].mean()), "final_x_std": float(final[:, 0].std()),
            "final_height_mean": float(final[:, 1].mean()), "final_height_std": float(final[:, 1].std()),
            "final": np.round(final, 4).tolist()}


def torso_positions(policy: Any, state: Any, envs: Sequence[Any], steps: int, mode: str,
                    seeds: Sequence[int]) -> np.ndarray:
    """Plays `envs` with `policy` for `steps` steps (`choreo.actors.rollout.rollout`) and
    returns the walker torso's (x, height) at every observation `[N, steps + 1, 2]`."""
    from choreo.actors.rollout import rollout

    out = np.empty((len(envs), steps + 1, 2))

    def record(t: int, observation: np.ndarray, _state: Any) -> None:
        for i, env in enumerate(envs):
            x, _, z = env.unwrapped.physics.named.data.xpos["torso"]
            out[i, t] = (x, z)

    rollout(policy, envs, steps, state=state, mode=mode, seeds=seeds, record=(), on_act=record)
    return out


def stage_diversity(b: Bench, allot: float, section: dict[str, Any]) -> None:
    from choreo.actors.envs import env_spec
    from choreo.actors.random_policy import UniformRandomPolicy
    from choreo.launch.runtime.snapshot import load_snapshot
    from choreo.vocabulary import derive_seed

    if b.walker_snapshot is None or not b.walker_snapshot.is_file():
        raise StageSkipped("needs the walker snapshot of stage 1 (resampling), which did not come")
    pre = load_snapshot(b.walker_snapshot)
    k = pre.num_skills
    # Within one episode: at its end the environment resets, and the positions would be the start's.
    episode = env_spec(pre.config.env.task).episode_length(pre.config.env.action_repeat) or 1001
    steps = int(np.clip(0.6 * allot / (3 * DIVERSITY_STEP_S), 50, min(1000, episode - 1)))
    vis_steps = int(np.clip(0.3 * allot / (k * RENDER_S), 10, 100))
    section["scale"] = {"snapshot": b.rel(b.walker_snapshot), "snapshot_frames": pre.frames, "episodes": k,
                        "steps": steps, "cell": [CELL_X, CELL_Z], "seed": SEED,
                        "modes": {"skills": "mode", "random": "sample", "explore": "sample"}}
    section["policies"] = {}
    b.say(f"{b.stage}: {k} skills, {k} random-action and {k} exploration episodes of {steps} steps")
    vector = pre.make_envs(k, seed=SEED)
    envs = vector.envs  # stepped one by one by the rollout
    seeds = [derive_seed(SEED, "diversity", i) for i in range(k)]
    try:
        skill = pre.policy("skill", seed=SEED)
        explore = pre.policy("explore", seed=SEED)
        players = {"skills": (skill, skill.initial_state(k, skill=np.arange(k)), "mode"),
                   "random": (UniformRandomPolicy(pre.action_dim, SEED), None, "sample"),
                   "explore": (explore, explore.initial_state(k), "sample")}
        for name, (policy, state, mode) in players.items():
            positions = torso_positions(policy, state, envs, steps, mode, seeds)
            section["policies"][name] = spread(positions)
            section["policies"][name]["paths"] = np.round(positions[:, :: max(1, steps // 50)], 3).tolist()
    finally:
        vector.close()
    b.save()
    section["visualize"] = visualize(b, vis_steps)


def visualize(b: Bench, steps: int) -> dict[str, Any]:
    """`choreo visualize` of the walker snapshot into visualize/ (GIFs of every skill, codebook.png)."""
    from choreo.launch.commands.visualize import run_visualize

    out = b.out / "visualize"
    b.say(f"{b.stage}: choreo visualize, {steps} steps per skill")
    try:
        with b.logged("visualize") as log:
            run_visualize(b.walker_snapshot, out, steps=steps, stream=log)
    except Exception as e:  # noqa: BLE001 - the pictures are a bonus; the numbers stand without them
        return {"dir": b.rel(out), "steps": steps, "error": f"{type(e).__name__}: {e}"}
    return {"dir": b.rel(out), "steps": steps, "gifs": sorted(b.rel(p) for p in out.glob("skill_*.gif")),
            "images": sorted(b.rel(p) for p in out.glob("*.png")), "error": None}


def judge_diversity(section: dict[str, Any]) -> dict[str, Any]:
    policies = section.get("policies", {})
    skills = policies.get("skills", {}).get("mean_pairwise_distance")
    random = policies.get("random", {}).get("mean_pairwise_distance")
    met = None if skills is None or random is None else bool(skills > random)
    return {"text": "the skills' final torso positions (x, height) spread wider than those of random actions "
                    "(mean pairwise distance)", "measured": skills, "baseline": random, "met": met}


# ---------------------------------------------------------------------------- 3. sparse rewards


def eval_sizes(seconds: float) -> dict[str, int]:
    """Zero-shot evaluation sizes that fit `seconds` (two tasks, each for the skills and for random
    actions): n Meta-World goals x n episodes per goal, and Jaco episodes. The paper: 50 goals x
    100 episodes, and 100 Jaco episodes."""
    per_goal, per_mw_episode, per_jaco_episode = 1.0, 0.3, 0.45  # seconds here (building a goal's environments)
    per_policy = seconds / 4
    n = 2
    while n < 50 and (n + 1) * (per_goal + per_mw_episode * (n + 1)) <= per_policy:
        n += 1
    return {"mw_goals": n, "mw_episodes": n, "jaco_episodes": int(np.clip(per_policy / per_jaco_episode, 4, 100))}


def spread_goals(n: int) -> list[int]:
    """`n` goal indices spread over Meta-World's 50."""
    return sorted({int(round(g)) for g in np.linspace(0, 49, n)})


def zero_shot(b: Bench, task: str, overrides: Sequence[str], snapshot: Path | None, episodes: int,
              goals: list[int] | None) -> dict[str, Any]:
    """`choreo evaluate --local` of the snapshot's skills (or, without one, random actions)."""
    from choreo.launch.commands.evaluate import evaluate
    from choreo.launch.runtime.rundir import RunDir
    from choreo.launch.runtime.snapshot import Snapshot

    policy = "skills" if snapshot else "random"
    name = f"{task}-zero-shot-{policy}"
    extra = [f"snapshot={snapshot.resolve()}"] if snapshot else []
    if snapshot and task.startswith("mw_"):
        extra.append(f"agent.choreographer.random_skill_every={SKILL_EVERY}")
    config = b.base_config(["mode=evaluate", *overrides, *extra, f"logdir={b.runs}", f"run_name={name}"])
    run_dir = RunDir.create(config, b.runs)
    with b.logged(name) as log, keep_threads():
        summary = evaluate(config, run_dir, episodes, "meta" if snapshot else "random", goals, local=True,
                           stream=log, snapshot=Snapshot.open(config.snapshot, config=config) if snapshot else None)
    summary["run_dir"] = b.rel(run_dir.path)
    return summary


def stage_sparse(b: Bench, allot: float, section: dict[str, Any]) -> None:
    sizes = eval_sizes(0.2 * allot)
    goals = spread_goals(sizes["mw_goals"])
    section["scale"] = {"skill_every": SKILL_EVERY, "goal_set": MW_GOAL_SET, "goals": goals,
                        "episodes_per_goal": sizes["mw_episodes"], "jaco_episodes": sizes["jaco_episodes"],
                        "rule": "an episode succeeds when its return exceeds 0 (Meta-World) or 1e-4 (Jaco)",
                        "paper": "50 goals x 100 episodes per goal set; 100 Jaco episodes; 2M "
                                                    "pretraining frames from pixels"}
    tasks = section["tasks"] = {}
    for task, overrides in SPARSE_TASKS.items():
        entry: dict[str, Any] = {"status": "running"}
        tasks[task] = entry
        mw = task.startswith("mw_")
        overrides = [*overrides, f"env.goal_set={MW_GOAL_SET}"] if mw else list(overrides)
        episodes = sizes["mw_episodes"] if mw else sizes["jaco_episodes"]
        entry.update(metric="success", episodes=episodes, goals=goals if mw else None)
        with _part(b, entry):
            step_s = STEP_S["mw" if mw else "jaco"]
            entry["pretrain"] = b.train(f"{task}-pretrain", "pretrain", overrides,
                                        b.plan("pretrain", overrides, 0.4 * allot, step_s), step_s)
            b.save()
            b.say(f"{b.stage}: choreo evaluate {task}: "
                  + (f"{len(goals)} goals x {episodes} episodes" if mw else f"{episodes} episodes")
                  + " each for the skills and for random actions")
            snapshot = b.out / entry["pretrain"]["snapshot"]
            entry["skills"] = zero_shot(b, task, overrides, snapshot, episodes, goals if mw else None)
            entry["random"] = zero_shot(b, task, overrides, None, episodes, goals if mw else None)
    _finish_parts(section, tasks)


def judge_sparse(section: dict[str, Any]) -> dict[str, Any]:
    verdicts = {}
    for task, entry in section.get("tasks", {}).items():
        metric = entry.get("metric")
        skills, random = (entry.get("skills") or {}).get(metric), (entry.get("random") or {}).get(metric)
        verdicts[task] = None if skills is None or random is None else bool(skills >= random)
    return {"text": "the pretrained skills find the sparse reward at least as often as random actions, on each task "
                    "(the paper, Table 1: Meta-World goal sets 0.78-0.84 against 0.47-0.51; Jaco 1.0 against 1.0)",
            "per_task": verdicts, "met": _all_met(verdicts)}


# ---------------------------------------------------------------------------- 4. fine-tuning


FINETUNE_TASK = "walker_stand"
TOP_SKILLS = 5
"""The held skills chosen on their single episodes and measured again: the best and the top 5."""


@dataclasses.dataclass(frozen=True)
class BesideSizes:
    """Episodes of the measurements beside the fine-tuning curves, on each snapshot."""

    remeasure: int
    """Fresh episodes of each of the TOP_SKILLS skills best on their single episodes."""
    random: int | None
    """Episodes of uniform random actions (None: as many as the skills held, one each)."""
    drift_skills: int | None
    """Skills the fine-tuned skill actors are held with (None: every one), spread over the codebook."""
    drift_every_run: bool
    """Every fine-tuned run's skill actors held (else the first seed's of each snapshot); the
    `agent.finetune.freeze_skills` control's always."""


PROTOCOL_SIZES = BesideSizes(remeasure=10, random=None, drift_skills=None, drift_every_run=True)
QUICK_SIZES = BesideSizes(remeasure=2, random=16, drift_skills=16, drift_every_run=False)
HELD_STEP_S = 0.0004
"""Seconds per environment step of a held-skill or random-action episode here (walker, a batched
policy call for up to 64 environments at the small size, one torch thread)."""
PAPER_FINETUNE = "2M pretraining frames; 100k fine-tuning frames, an evaluation of 10 episodes every 10k, 10 seeds"
REFERENCE_META = ("a new skill every step once the reward gate opens (a batch held a reward >= 1e-4), before "
                  "that a random skill held for 125 steps; the executor (skill actor) fine-tuned with it")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the stage."""

    name: str
    start: str
    """"finetune" (from a snapshot), "scratch" (random weights) or "freeze" (from a snapshot,
    `agent.finetune.freeze_skills=true`: the executor keeps its pretrained weights)."""
    seed: int
    snapshot: str | None
    """The label of the snapshot it starts from."""
    overrides: tuple[str, ...]


def finetune_specs(snapshots: Sequence[Path], labels: Sequence[str], seeds: Sequence[int],
                   task: str = FINETUNE_TASK) -> list[RunSpec]:
    """Seed by seed, the run from scratch (one per seed: it does not depend on the snapshot) and
    the fine-tuning of each snapshot, so that a stage stopped early leaves comparable sets; then
    the control with a frozen executor, on the first snapshot and seed."""
    base = ("mode=finetune", f"env.task={task}")
    specs = []
    for seed in seeds:
        specs.append(RunSpec(f"{task}-scratch-seed{seed}", "scratch", seed, None,
                             (*base, f"seed={seed}", "from_scratch=true")))
        for label, path in zip(labels, snapshots):
            specs.append(RunSpec(f"{task}-{label}-finetune-seed{seed}", "finetune", seed, label,
                                 (*base, f"seed={seed}", f"snapshot={Path(path).resolve()}")))
    specs.append(RunSpec(f"{task}-{labels[0]}-freeze-seed{seeds[0]}", "freeze", seeds[0], labels[0],
                         (*base, f"seed={seeds[0]}", f"snapshot={Path(snapshots[0]).resolve()}",
                          "agent.finetune.freeze_skills=true")))
    return specs


def finetune_plan(b: Bench, seconds: float, overrides: Sequence[str]) -> RunPlan:
    """`--quick`: a fine-tuning run that fits `seconds` with its evaluations: at frame 0 and every
    quarter of the run (10 episodes) when it can afford them, else fewer episodes at the start and
    the end."""
    evals = 5 if seconds >= 120 else 2
    episodes = int(np.clip(seconds / 15, 2, 10))
    eval_s = evals * WALKER_EPISODE * (EVAL_STEP_S + episodes * STEP_S["walker"] / 5)
    step_s = STEP_S["walker"]
    plan = b.plan("finetune", overrides, seconds - eval_s, step_s)
    every = int(math.ceil(plan.frames / (evals - 1) / 10) * 10)
    plan.steps = every * (evals - 1) // plan.action_repeat
    plan.updates = int((plan.steps - plan.warm) / plan.steps_per_update)
    plan.seconds = RUN_OVERHEAD_S + plan.steps * step_s + plan.updates * b.costs.finetune + eval_s
    plan.eval_every, plan.eval_episodes = every, episodes
    return plan


def protocol_plan(b: Bench, overrides: Sequence[str]) -> RunPlan:
    """The paper's fine-tuning run as the preset states it (configs/mode/finetune.yaml: 100k frames,
    an evaluation of 10 episodes at frame 0 and every 10k), with its estimated seconds."""
    from choreo.launch.runtime.config import warmup_steps

    config = b.base_config(overrides)
    rb, ar = config.replay, config.env.action_repeat
    steps_per_update = rb.batch_size * rb.batch_length / rb.samples_per_insert
    steps, warm = config.learner.total_frames // ar, warmup_steps(config)
    updates = max(int((steps - warm) / steps_per_update), 0)
    every, episodes = config.eval.every_frames, config.eval.episodes
    evals = config.learner.total_frames // every + 1 if every else 0
    eval_s = evals * WALKER_EPISODE * (EVAL_STEP_S + episodes * HELD_STEP_S)
    seconds = RUN_OVERHEAD_S + steps * STEP_S["walker"] + updates * b.costs.finetune + eval_s
    return RunPlan(steps, warm, updates, ar, seconds, steps_per_update, eval_every=every, eval_episodes=episodes)


def beside_seconds(sizes: BesideSizes, skills: int, snapshots: int, drift_runs: int) -> float:
    """Estimated seconds of the held-skill, random-action and drift episodes."""
    episodes = snapshots * (skills + TOP_SKILLS * sizes.remeasure + (sizes.random or skills))
    episodes += drift_runs * (sizes.drift_skills or skills)
    return episodes * WALKER_EPISODE * HELD_STEP_S


def drift_codes(num_skills: int, count: int | None) -> list[int]:
    """The codes the fine-tuned skill actors are held with: every one, or `count` spread over them."""
    if count is None or count >= num_skills:
        return list(range(num_skills))
    return sorted({int(round(c)) for c in np.linspace(0, num_skills - 1, count)})


def held_seed(code: int, episode: int | None = None) -> int:
    """The reset seed of skill `code`'s selection episode (None), or of its fresh episode `episode`:
    a skill meets the same episodes from the snapshot and from a fine-tuned run."""
    from choreo.vocabulary import derive_seed

    return derive_seed(SEED, "held", code) if episode is None else derive_seed(SEED, "held", code, "fresh", episode)


def play_episodes(policy: Any, envs: Sequence[Any], seeds: Sequence[int], state: Any = None,
                  mode: str = "mode") -> list[float]:
    """One episode of each environment (environment i reset with `seeds[i]`), `policy` acting from
    `state` (`choreo.actors.rollout.rollout`): their returns. One torch thread: batched calls this
    small gain nothing from a second, and lose several times over when another process shares
    the cores."""
    from choreo.actors.rollout import rollout

    with keep_threads(1):
        return [float(r) for r in rollout(policy, envs, episodes=len(envs), state=state, mode=mode, seeds=seeds,
                                          record=())["returns"]]


def held_returns(pre: Any, codes: Sequence[int], seeds: Sequence[int]) -> list[float]:
    """Skill `codes[i]` of the loaded snapshot `pre` (`load_snapshot`) held for one episode of
    environment i (reset with `seeds[i]`), mean actions as the fine-tuning evaluations act."""
    vector = pre.make_envs(len(codes), seed=SEED)
    try:
        policy = pre.policy("skill", seed=SEED)
        return play_episodes(policy, vector.envs, seeds, policy.initial_state(len(codes), skill=np.asarray(codes)))
    finally:
        vector.close()


def random_returns(pre: Any, episodes: int) -> list[float]:
    """Uniform random actions for `episodes` episodes of `pre`'s task."""
    from choreo.actors.random_policy import UniformRandomPolicy
    from choreo.vocabulary import derive_seed

    vector = pre.make_envs(episodes, seed=SEED)
    try:
        return play_episodes(UniformRandomPolicy(pre.action_dim, SEED), vector.envs,
                             [derive_seed(SEED, "random", i) for i in range(episodes)], mode="sample")
    finally:
        vector.close()


def describe_snapshot(b: Bench, label: str, path: Path) -> dict[str, Any]:
    """A snapshot and its pretraining, as the report names it."""
    from choreo.launch.runtime.snapshot import Snapshot

    snap = Snapshot.open(path)
    c = snap.config
    return {"label": label, "path": b.rel(path), "frames": snap.frames, "updates": snap.updates, "size": c.size,
            "task": c.env.task, "obs": c.env.obs, "seed": c.seed, "num_skills": c.agent.choreographer.num_codes,
            "status": "running"}


def measure_beside(b: Bench, entry: dict[str, Any], path: Path, sizes: BesideSizes) -> None:
    """On one snapshot: every skill held for one episode; the TOP_SKILLS best of those measured again
    on `sizes.remeasure` fresh episodes each; uniform random actions."""
    from choreo.launch.runtime.snapshot import load_snapshot

    pre = load_snapshot(path, task=FINETUNE_TASK)
    k = pre.num_skills
    codes = list(range(k))
    b.say(f"{b.stage}: {entry['label']}: {k} skills held for an episode each")
    entry["held"] = {"codes": codes, "returns": held_returns(pre, codes, [held_seed(c) for c in codes])}
    b.save()
    top = top_skills(entry["held"]["returns"], TOP_SKILLS)
    b.say(f"{b.stage}: {entry['label']}: skills {', '.join(map(str, top))} again, {sizes.remeasure} fresh "
          f"episodes each")
    repeated = [c for c in top for _ in range(sizes.remeasure)]
    fresh = held_returns(pre, repeated, [held_seed(c, j) for c in top for j in range(sizes.remeasure)])
    entry["remeasure"] = {"codes": top, "returns": {str(c): fresh[i * sizes.remeasure:(i + 1) * sizes.remeasure]
                                                    for i, c in enumerate(top)}}
    b.save()
    episodes = sizes.random or k
    b.say(f"{b.stage}: {entry['label']}: {episodes} episodes of random actions")
    entry["random"] = {"returns": random_returns(pre, episodes)}


def finetuned_held(b: Bench, run: dict[str, Any], codes: Sequence[int]) -> dict[str, Any]:
    """The fine-tuned skill actors of `run` (its final agent) held as the snapshot's were: the same
    codes on the same episodes."""
    from choreo.launch.runtime.snapshot import load_snapshot

    pre = load_snapshot(b.out / run["final_agent"], task=FINETUNE_TASK)
    return {"codes": list(codes), "returns": held_returns(pre, codes, [held_seed(c) for c in codes])}


def read_eval_curve(run_dir: Path) -> list[list[float]]:
    """[[frame, mean return], ...] of a run's eval.jsonl."""
    from choreo.launch.runtime.rundir import RunDir

    records = sorted(RunDir(run_dir).read_evals(), key=lambda r: r.frame)
    return [[r.frame, r.mean_return] for r in records]


def read_eval_picks(run_dir: Path) -> list[list[Any]]:
    """[[frame, [{skill: steps} per episode]], ...]: the skills the meta-controller chose in each
    evaluation episode (eval.jsonl's `skill_counts`)."""
    from choreo.launch.runtime.rundir import RunDir

    records = sorted(RunDir(run_dir).read_evals(), key=lambda r: r.frame)
    return [[r.frame, r.extra["skill_counts"]] for r in records if r.extra.get("skill_counts")]


def stage_finetune(b: Bench, allot: float, section: dict[str, Any]) -> None:
    snapshots = b.snapshots or ([b.walker_snapshot] if b.walker_snapshot and b.walker_snapshot.is_file() else [])
    if not snapshots:
        raise StageSkipped("needs a walker snapshot: stage 1's (resampling), which did not come, or --snapshot FILE")
    sizes = QUICK_SIZES if b.quick else PROTOCOL_SIZES
    seeds = list(range(b.seeds))
    labels = [f"S{i}" for i in range(1, len(snapshots) + 1)]
    entries = section["snapshots"] = [describe_snapshot(b, label, path) for label, path in zip(labels, snapshots)]
    specs = finetune_specs(snapshots, labels, seeds)
    drifted = {s.name for s in specs if s.start == "freeze" or (s.start == "finetune" and (
        sizes.drift_every_run or s.seed == seeds[0]))}
    skills = entries[0]["num_skills"]
    first = list(specs[1].overrides)
    if b.quick:
        beside = beside_seconds(sizes, skills, len(snapshots), len(drifted))
        plan = finetune_plan(b, max(allot - beside, 0.0) / len(specs), first)
    else:
        plan = protocol_plan(b, first)
    parallel = min(b.parallel, len(specs))
    config = b.base_config(first)
    section["scale"] = {
        "protocol": "quick" if b.quick else "paper", "task": FINETUNE_TASK, "seeds": seeds,
        "frames": plan.frames, "warm_frames": plan.warm * plan.action_repeat, "planned_updates": plan.updates,
        "eval_every": plan.eval_every, "eval_episodes": plan.eval_episodes, "second_half_from": plan.frames // 2,
        "parallel": parallel, "threads_per_run": b.threads if parallel == 1 else max(1, b.threads // parallel),
        "top": TOP_SKILLS, "remeasure_episodes": sizes.remeasure, "random_episodes": sizes.random or skills,
        "drift_skills": len(drift_codes(skills, sizes.drift_skills)), "num_skills": skills,
        "random_skill_every": config.agent.choreographer.random_skill_every, "preset": PRESET,
        "paper": PAPER_FINETUNE, "reference": REFERENCE_META}
    b.say(f"{b.stage}: {len(specs)} runs of {plan.frames:,} frames ({len(seeds)} seeds from scratch, from each of "
          f"{len(snapshots)} snapshot{'s' if len(snapshots) > 1 else ''}, one with a frozen executor), {parallel} at a "
          f"time; ~{fmt_s(plan.seconds * math.ceil(len(specs) / parallel))} of runs")
    for entry, path in zip(entries, snapshots):
        with _part(b, entry):
            measure_beside(b, entry, path, sizes)
    runs = section["runs"] = []
    parent = b.runs / "finetune"

    def finished(spec: RunSpec, run: dict[str, Any] | None, error: BaseException | None) -> None:
        run = run or {"name": spec.name}
        # In the stage, "snapshot" is the one a run starts from; the run's own final agent goes apart.
        run["final_agent"] = run.pop("snapshot", None)
        run.update(task=FINETUNE_TASK, seed=spec.seed, start=spec.start, snapshot=spec.snapshot)
        runs.append(run)
        with _part(b, run):
            if error is not None:
                raise error
            run_dir = b.out / run["run_dir"]
            run["curve"] = read_eval_curve(run_dir)
            run["picks"] = read_eval_picks(run_dir)
            run["final_return"] = run["curve"][-1][1] if run["curve"] else None
            entry = next(e for e in entries if e["label"] == spec.snapshot) if spec.snapshot else None
            if spec.name in drifted and entry is not None and entry.get("held"):
                b.say(f"{b.stage}: {spec.name}: its skill actors held as the snapshot's were")
                run["held"] = finetuned_held(b, run, drift_codes(len(entry["held"]["returns"]), sizes.drift_skills))
            section["analysis"] = analyse_finetune(section)

    b.train_runs(specs, plan, parent, parallel, sized=b.quick,
                 watchdog=WATCHDOG_FACTOR if b.quick else PROTOCOL_WATCHDOG_FACTOR, finished=finished)
    section["reports"] = [finetune_report(b, entry["label"], runs) for entry in entries]
    section["analysis"] = analyse_finetune(section)
    _finish_parts(section, {**{e["label"]: e for e in entries}, **{r["name"]: r for r in runs}})


def finetune_report(b: Bench, label: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`choreo report` on the eval.jsonl of one snapshot's fine-tuning runs and of the runs from
    scratch: its tables and plot (bootstrap intervals, probability of improvement)."""
    from choreo.launch.commands import report

    dirs = [str(b.out / r["run_dir"]) for r in runs if r.get("run_dir") and r.get("status") == "ok"
            and (r["start"] == "scratch" or (r["start"] == "finetune" and r["snapshot"] == label))]
    buffer = io.StringIO()
    out = b.out / "finetune"
    rc = report.run(dirs, plot_path=str(out / f"report-{label}.png"), markdown_path=str(out / f"report-{label}.md"),
                    out=buffer, err=buffer)
    return {"label": label, "text": buffer.getvalue(), "rc": rc, "markdown": f"finetune/report-{label}.md",
            "plot": f"finetune/report-{label}.png"}


# The arithmetic of the stage (pure: hand-made numbers in, numbers out).


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "se", "n"}: the standard error with ddof=1 (0 for one value); None values for none."""
    from choreo.launch.commands.report import mean_se as report_mean_se

    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "se": None, "n": 0}
    mean, se = report_mean_se(values)
    return {"mean": mean, "se": se, "n": len(values)}


def second_half(curve: Sequence[Sequence[float]], start: float) -> float | None:
    """The mean of a run's evaluations from frame `start` on (None when it has none there)."""
    values = [v for f, v in curve if f >= start]
    return float(np.mean(values)) if values else None


def above_by_two_se(better: Sequence[float], worse: Sequence[float]) -> dict[str, Any]:
    """Whether the mean of `better` (one value per run) exceeds that of `worse` by more than two
    standard errors of the difference, sqrt(se_b^2 + se_w^2); not measured (met None) with fewer
    than two runs on either side, where a standard error says nothing."""
    a, b = mean_se(better), mean_se(worse)
    if not a["n"] or not b["n"]:
        return {"better": a, "worse": b, "difference": None, "se": None, "met": None}
    difference, se = a["mean"] - b["mean"], math.hypot(a["se"], b["se"])
    met = bool(difference > 2 * se) if a["n"] > 1 and b["n"] > 1 else None
    return {"better": a, "worse": b, "difference": difference, "se": se, "met": met}


def top_skills(returns: Sequence[float], k: int = TOP_SKILLS) -> list[int]:
    """The `k` skills with the highest returns, best first (a tie: the lower index first)."""
    order = sorted(range(len(returns)), key=lambda i: (-returns[i], i))
    return order[:k]


def held_summary(returns: Sequence[float], remeasured: dict[str, Sequence[float]], k: int = TOP_SKILLS
                 ) -> dict[str, Any]:
    """The held-skill baselines: the best skill and the top `k`, chosen on their single episodes
    (`returns`, one per skill), and their returns on fresh episodes (`remeasured`, skill -> returns);
    the median and the mean of all skills' single episodes."""
    top = top_skills(returns, k)
    fresh = {int(c): [float(v) for v in vs] for c, vs in remeasured.items()}
    measured = [c for c in top if fresh.get(c)]
    best = top[0] if top else None
    out: dict[str, Any] = {"skills": len(returns), "top": top, "best": best, "order": top_skills(returns, len(returns)),
                           "best_selection": float(returns[best]) if best is not None else None,
                           "top_selection": float(np.mean([returns[c] for c in top])) if top else None,
                           "median": float(np.median(returns)) if len(returns) else None,
                           "mean": float(np.mean(returns)) if len(returns) else None,
                           "remeasured": {str(c): mean_se(fresh[c]) for c in measured}}
    out["best_remeasured"] = mean_se(fresh.get(best, [])) if best is not None else mean_se([])
    out["top_remeasured"] = mean_se([v for c in measured for v in fresh[c]])
    if measured:
        winner = max(measured, key=lambda c: (np.mean(fresh[c]), -c))
        out["best_of_top_remeasured"] = {"skill": winner, **mean_se(fresh[winner])}
    return out


def pick_counts(picks: Sequence[Sequence[Any]], num_skills: int) -> dict[int, np.ndarray]:
    """frame -> steps each skill was chosen `[num_skills]`, summed over the episodes of every
    evaluation at that frame (`picks`: the runs' [frame, [{skill: steps} per episode]] lists, concatenated)."""
    out: dict[int, np.ndarray] = {}
    for frame, episodes in picks:
        counts = out.setdefault(int(frame), np.zeros(num_skills, np.int64))
        for episode in episodes:
            for skill, steps in episode.items():
                counts[int(skill)] += int(steps)
    return dict(sorted(out.items()))


def pick_ranking(counts: np.ndarray, held: Sequence[float], k: int = TOP_SKILLS) -> dict[str, Any]:
    """How the skills chosen (`counts [K]`, steps per skill) rank against the skills held still
    (`held [K]`, one return each): the share of the steps on the top `k` held skills (and what a
    uniform choice would give), the most chosen skill and its held rank (1: the best), and the
    held return of the choices weighted by their steps against the mean of all."""
    counts, held = np.asarray(counts, np.float64), np.asarray(held, np.float64)
    total = counts.sum()
    if not total:
        return {"steps": 0}
    top = top_skills(list(held), k)
    ranks = np.empty(len(held), np.int64)
    ranks[top_skills(list(held), len(held))] = np.arange(1, len(held) + 1)
    most = int(np.argmax(counts))
    return {"steps": int(total), "share_top": float(counts[top].sum() / total), "chance_top": len(top) / len(held),
            "most_picked": most, "most_picked_share": float(counts[most] / total),
            "most_picked_rank": int(ranks[most]), "skills_picked": int((counts > 0).sum()),
            "weighted_held": float((counts * held).sum() / total), "mean_held": float(held.mean())}


def picks_per_episode(picks: Sequence[Sequence[Any]]) -> dict[int, float]:
    """frame -> the mean number of distinct skills chosen in an evaluation episode."""
    out: dict[int, list[int]] = {}
    for frame, episodes in picks:
        out.setdefault(int(frame), []).extend(len(e) for e in episodes)
    return {f: float(np.mean(v)) for f, v in sorted(out.items())}


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties ranked by position); None when either side is constant."""
    if len(x) < 2:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def drift(before: Sequence[float], after: Sequence[float], top: Sequence[int] = ()) -> dict[str, Any]:
    """How far held-skill returns moved, skill by skill (`before`, `after`: the same skills on the
    same episodes): mean change, mean absolute change, rank correlation; on the positions `top`
    (the snapshot's best skills among them) their mean before and after."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    out = {"skills": len(b), "mean_before": float(b.mean()), "mean_after": float(a.mean()),
           "mean_change": float((a - b).mean()), "mean_abs_change": float(np.abs(a - b).mean()),
           "rank_correlation": rank_correlation(b, a)}
    if len(top):
        out.update(top_before=float(b[list(top)].mean()), top_after=float(a[list(top)].mean()))
    return out


def analyse_finetune(section: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the stage from its runs and snapshots: the claim over seeds and snapshots
    (second half of the budget, last evaluation), and per snapshot the held-skill and random-action
    baselines, the meta-controller's choices at each evaluation and the executor's drift."""
    scale = section.get("scale", {})
    k = scale.get("top", TOP_SKILLS)
    start = scale.get("second_half_from", 0)
    runs = [r for r in section.get("runs", []) if r.get("curve")]

    def values(origin: str, label: str | None = None, late: bool = False) -> list[float]:
        chosen = [r for r in runs if r["start"] == origin and (label is None or r.get("snapshot") == label)]
        got = [second_half(r["curve"], start) if late else r["curve"][-1][1] for r in chosen]
        return [v for v in got if v is not None]

    out: dict[str, Any] = {"claim": {"second_half": above_by_two_se(values("finetune", late=True),
                                                                    values("scratch", late=True)),
                                     "last": above_by_two_se(values("finetune"), values("scratch"))},
                           "snapshots": {}}
    for entry in section.get("snapshots", []):
        label = entry["label"]
        s: dict[str, Any] = {"finetune_last": mean_se(values("finetune", label)),
                             "finetune_second_half": mean_se(values("finetune", label, late=True)),
                             "claim": {"second_half": above_by_two_se(values("finetune", label, late=True),
                                                                      values("scratch", late=True)),
                                       "last": above_by_two_se(values("finetune", label), values("scratch"))}}
        held = (entry.get("held") or {}).get("returns")
        if entry.get("random"):
            s["random"] = mean_se(entry["random"]["returns"])
        if held:
            s["held"] = held_summary(held, (entry.get("remeasure") or {}).get("returns", {}), k)
            tuned, best = s["finetune_last"]["mean"], s["held"]["best_remeasured"]["mean"]
            s["versus_held"] = {"finetune_last": tuned, "best_remeasured": best,
                                "met": None if tuned is None or best is None else bool(tuned >= best)}
            for mode in ("finetune", "freeze"):
                picks = [p for r in runs if r["start"] == mode and r.get("snapshot") == label
                         for p in r.get("picks", [])]
                if picks:
                    distinct = picks_per_episode(picks)
                    s[f"picks_{mode}"] = [{"frame": f, "counts": c.tolist(), "distinct_per_episode": distinct.get(f),
                                           **pick_ranking(c, held, k)}
                                          for f, c in pick_counts(picks, len(held)).items()]
            s["drift"] = []
            for r in runs:
                if r.get("snapshot") == label and r.get("held"):
                    codes = r["held"]["codes"]
                    before = [held[c] for c in codes]
                    top = [i for i, c in enumerate(codes) if c in s["held"]["top"]]
                    s["drift"].append({"run": r["name"], "start": r["start"], "seed": r["seed"],
                                       **drift(before, r["held"]["returns"], top)})
        out["snapshots"][label] = s
    return out


def judge_finetune(section: dict[str, Any]) -> dict[str, Any]:
    """Two lines: fine-tuned above scratch by two standard errors over seeds and snapshots, over the
    second half of the budget and at the last evaluation; fine-tuned at least as good as the best
    held skill re-measured, on every snapshot."""
    analysis = section.get("analysis") or analyse_finetune(section)
    scale = section.get("scale", {})
    claim = analysis["claim"]
    halves = [claim["second_half"]["met"], claim["last"]["met"]]
    above = False if False in halves else (True if all(v is True for v in halves) else None)
    held = {label: s.get("versus_held", {}).get("met") for label, s in analysis["snapshots"].items()}
    lines = {"above scratch": above, "at least the best held skill": _all_met(held) if held else None}
    return {"text": f"(1) on {scale.get('task', FINETUNE_TASK)}, fine-tuned from the snapshot above from scratch by "
                    f"more than two standard errors of the difference (sqrt(se_f^2 + se_s^2), over seeds and "
                    f"snapshots), both over the second half of the budget (evaluations from "
                    f"{_num(scale.get('second_half_from'))} frames on) and at the last evaluation "
                    f"({_num(scale.get('frames'))} frames); (2) fine-tuned, at the last evaluation, at least as good "
                    f"as the best held skill measured again on fresh episodes, on each snapshot",
            "per_line": lines, "second_half": claim["second_half"], "last": claim["last"],
            "versus_held": {label: s.get("versus_held") for label, s in analysis["snapshots"].items()},
            "measured": claim["second_half"]["difference"],
            "two_se": None if claim["second_half"]["se"] is None else 2 * claim["second_half"]["se"],
            "met": _all_met(lines)}


# ---------------------------------------------------------------------------- 5. planning


def plan_episodes(seconds: float) -> int:
    """Episodes of each of the four planning evaluations that fit `seconds` (docs/dads-and-planning.md: 40)."""
    per_episode = 0.5  # seconds here, the codebook planner's (the slowest) with room to spare
    return int(np.clip(seconds / (4 * per_episode), 5, 50))


def zero_shot_plan(b: Bench, name: str, snapshot: Path, episodes: int, policy: str,
                   extra: Sequence[str] = ()) -> dict[str, Any]:
    """`choreo plan --local` of a snapshot on point_mass_nav (`policy` "plan" or "random")."""
    from choreo.launch.commands.plan import plan
    from choreo.launch.runtime.rundir import RunDir
    from choreo.launch.runtime.snapshot import Snapshot

    run_name = f"{name}-{policy}"
    config = Snapshot.open(snapshot, ["dataset.dir=", "dataset.collect=false", f"run_name={run_name}",
                                      f"logdir={b.runs}", "env.task=point_mass_nav", *extra]).config
    run_dir = RunDir.create(config, b.runs)
    with b.logged(run_name) as log, keep_threads():
        summary = plan(config, snapshot, run_dir, episodes, policy, local=True, stream=log)
    summary["run_dir"] = b.rel(run_dir.path)
    return summary


def stage_planning(b: Bench, allot: float, section: dict[str, Any]) -> None:
    episodes = plan_episodes(0.2 * allot)
    section["scale"] = {"task": "point_mass_nav", "episodes": episodes,
                        "reference": "docs/dads-and-planning.md, measured by hand: DADS pretraining of 20k frames (agent.dads.hidden=128 "
                                     "agent.dads.prior_samples=32) plans to Delta 0.35 +- 0.03 against 1.39 +- 0.14 "
                                     "for random skills"}
    agents = section["agents"] = {}
    for name, kind, overrides, planner, share in (("dads", "dads", DADS, (), 0.15),
                                                  ("choreographer", "pretrain", CHOREO_NAV, CODEBOOK_PLANNER, 0.65)):
        entry: dict[str, Any] = {"status": "running", "overrides": list(overrides), "planner": list(planner)}
        agents[name] = entry
        with _part(b, entry):
            step_s = STEP_S["point"]
            entry["pretrain"] = b.train(f"point_mass_nav-{name}", kind, overrides,
                                        b.plan(kind, overrides, share * allot, step_s), step_s)
            b.save()
            b.say(f"{b.stage}: choreo plan with the {name} snapshot and with random skills, {episodes} episodes each")
            snapshot = b.out / entry["pretrain"]["snapshot"]
            entry["plan"] = zero_shot_plan(b, f"point_mass_nav-{name}", snapshot, episodes, "plan", planner)
            entry["random"] = zero_shot_plan(b, f"point_mass_nav-{name}", snapshot, episodes, "random", planner)
    _finish_parts(section, agents)


def judge_planning(section: dict[str, Any]) -> dict[str, Any]:
    verdicts = {}
    for name, entry in section.get("agents", {}).items():
        planned, random = entry.get("plan") or {}, entry.get("random") or {}
        if "normalised_distance" not in planned or "normalised_distance" not in random:
            verdicts[name] = None
            continue
        se = math.hypot(planned.get("normalised_distance_se", 0.0), random.get("normalised_distance_se", 0.0))
        verdicts[name] = bool(random["normalised_distance"] - planned["normalised_distance"] > 2 * se)
    return {"text": "planning ends closer to the goal than random skills: a normalised distance "
                    "Delta = mean_t ||g - u_t|| / ||g - u_0|| lower than random skills' by more than two standard "
                    "errors of the difference, for DADS and for Choreographer's codebook",
            "per_agent": verdicts, "met": _all_met(verdicts)}


@contextlib.contextmanager
def keep_threads(threads: int | None = None) -> Iterator[None]:
    """Torch's thread count set to `threads` (None: left), and as it was afterwards (`choreo
    plan`'s jobs set it to 1 in this process)."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


STAGE_FUNCTIONS: dict[str, Callable[[Bench, float, dict[str, Any]], None]] = {
    "resampling": stage_resampling, "diversity": stage_diversity, "sparse": stage_sparse,
    "finetune": stage_finetune, "planning": stage_planning,
}
"""Each fills the section it is given (scale, runs, numbers) as it goes."""
JUDGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "resampling": judge_resampling, "diversity": judge_diversity, "sparse": judge_sparse,
    "finetune": judge_finetune, "planning": judge_planning,
}
"""Each states a stage's target and whether its numbers meet it (None: not measured)."""


# ============================================================================ the command


def run(rest: list[str], as_json: bool = False) -> int:
    """`choreo bench learning [--budget-minutes N] [--out DIR] [--stages a,b]`: returns 0 when every
    stage ran (targets met or not), 1 when one failed, 130 when interrupted."""
    p = argparse.ArgumentParser(prog="choreo bench learning",
                                description="Evidence that the system learns: the pipeline at the small size within "
                                            "a budget, written up as report.md and results.json.")
    p.add_argument("--budget-minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"wall-clock budget of the whole bench (default {DEFAULT_MINUTES:g})")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/bench-learning-<time>/)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every run (learner.threads) and of the evaluations in this process "
                        "(default 0: every core; 1 holds up better while other processes share the cores)")
    p.add_argument("--snapshot", action="append", default=[], metavar="FILE",
                   help="a walker snapshot from states (small size) for the diversity and finetune stages, in place "
                        "of the one the resampling stage writes; repeat it to fine-tune several (diversity plays the "
                        "first)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in their order (default all: {','.join(STAGES)})")
    p.add_argument("--quick", action="store_true",
                   help="the finetune stage scaled to its share of the budget (minutes), instead of the paper's "
                        "protocol (100k frames per run, hours), which runs outside the budget")
    p.add_argument("--seeds", type=int, default=len(FINETUNE_SEEDS),
                   help=f"fine-tuning seeds 0..N-1 (default {len(FINETUNE_SEEDS)})")
    p.add_argument("--parallel", type=int, default=0,
                   help=f"fine-tuning runs at once, each in a process of its own with the cores shared between them "
                        f"(default 0: one per {CORES_PER_RUN} cores, here {default_parallel()}; 1: one after another "
                        f"in this process)")
    args = p.parse_args(rest)
    if not args.budget_minutes > 0:
        p.error("--budget-minutes must be positive")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.parallel < 0:
        p.error("--parallel must be 0 (automatic) or more")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        p.error(f"--stages: unknown {', '.join(unknown) or 'none given'}; choose from {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    for snapshot in args.snapshot:
        if not Path(snapshot).is_file():
            p.error(f"--snapshot {snapshot}: no such file")
    os.environ.setdefault("MUJOCO_GL", "egl")
    out = Path(args.out or f"runs/bench-learning-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} is not empty; the bench writes into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if as_json else sys.stdout
    outside = [] if args.quick else [s for s in stages if s == "finetune"]
    budget = Budget(args.budget_minutes * 60.0, {s: 0.0 if s in outside else FRACTIONS[s] for s in stages})
    bench = Bench(out, budget, stream, stages, threads=max(args.threads, 0), quick=args.quick, seeds=args.seeds,
                  parallel=args.parallel)
    bench.outside = outside
    if args.snapshot:
        bench.snapshots = [Path(f).resolve() for f in args.snapshot]
        bench.walker_snapshot = bench.snapshots[0]
    bench.results = new_results(args.budget_minutes, stages, " ".join(["choreo bench learning", *rest]),
                                bench.threads, seeds=args.seeds, outside=outside)
    bench.say(f"writing into {out}; stages {', '.join(stages)}; preset {PRESET}, every run in this process (--local)")
    rc = 0
    try:
        with stop_on_signals(), keep_threads(bench.threads):  # SIGTERM as Ctrl-C: the report is written
            bench.say("calibrating: the learner's update of each kind on random batches")
            bench.costs = calibrate(timed=3, common=bench.common)
            bench.results["calibration"] = _costs_dict(bench.costs)
            bench.say(f"an update takes {bench.costs.pretrain:.2f} s pretraining, {bench.costs.finetune:.2f} s "
                      f"fine-tuning, {bench.costs.dads * 1000:.0f} ms DADS (calibration "
                      f"{bench.costs.calibration_s:.0f} s)")
            bench.save()
            for i, stage in enumerate(stages, 1):
                bench.run_stage(stage, i)
    except KeyboardInterrupt:
        rc = 130
        bench.results["interrupted"] = True
        bench.say("interrupted: writing the report of what was done")
    bench.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    bench.save()
    if rc == 0 and any(s.get("status") in ("failed", "partial") for s in bench.results["stages"].values()):
        rc = 1
    if as_json:
        print(json.dumps(bench.results, indent=1, default=_json_default))
    else:
        for line in summary_lines(bench.results):
            print(line, file=stream)
        print(f"report: {out / 'report.md'}; numbers: {out / 'results.json'}", file=stream)
    return rc


def new_results(minutes: float, stages: Sequence[str], command: str, threads: int, seeds: int = len(FINETUNE_SEEDS),
                outside: Sequence[str] = ()) -> dict[str, Any]:
    import torch

    from choreo.launch.runtime.config import load_config

    learner = load_config([PRESET], WALKER).learner

    return {"format": "choreo-bench-learning", "version": 1, "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": PRESET, "seed": SEED,
            "finetune_seeds": list(range(seeds)), "execution": "local",
            "machine": {"cpus": os.cpu_count(), "learner_threads": threads, "learner_device": learner.device,
                        "gpu": bool(torch.cuda.is_available()), "load_1m_at_start": os.getloadavg()[0]},
            "budget": {"minutes": minutes, "seconds": minutes * 60.0,
                       "fractions": {s: FRACTIONS[s] for s in stages if s not in outside},
                       "outside": list(outside), "stages": {}},
            "calibration": {}, "estimates": {}, "selected": list(stages), "stages": {}}


# ============================================================================ the report (pure)


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def _verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured"}[met]


def _target_verdict(target: dict[str, Any]) -> str:
    """The verdict of a target; one not measured as a whole says which of its parts it met."""
    met = target.get("met")
    if target.get("per_line"):  # a verdict of several lines gives each
        return "; ".join(f"{name}: {_verdict(v)}" for name, v in target["per_line"].items())
    parts = target.get("per_task") or target.get("per_agent") or {}
    if met is not None or not any(v is not None for v in parts.values()):
        return _verdict(met)
    return "; ".join(f"{_verdict(v)} on {name}" for name, v in parts.items())


def _hours(seconds: float) -> str:
    return f"about {seconds / 3600:.1f} hours" if seconds >= 3600 else f"about {seconds / 60:.0f} minutes"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per stage: status and verdict, for the terminal."""
    lines = []
    for i, stage in enumerate(results.get("selected", STAGES), 1):
        section = results.get("stages", {}).get(stage)
        if section is None:
            lines.append(f"{i}. {TITLES[stage]}: not run")
            continue
        target = section.get("target", {})
        lines.append(f"{i}. {TITLES[stage]}: {section.get('status')}"
                     + (f", target {'met' if target.get('met') else 'missed'}" if target.get("met") is not None else "")
                     + (f" ({section['error']})" if section.get("error") else ""))
    return lines


def _figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, out: Path, name: str) -> str:
    path = out / "plots" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return f"plots/{name}"


def plot_resampling(section: dict[str, Any], out: Path) -> str | None:
    runs = section.get("runs", {})
    if not any(r.get("curves") for r in runs.values()):
        return None
    codes = section["scale"]["num_codes"]
    fig, axes = _figure(15, 4, 3)
    styles = {"with": ("C0", "-", "with resampling"), "without": ("C3", "--", "without resampling")}
    for key, run in runs.items():
        colour, line, label = styles.get(key, ("C7", ":", key))
        curves = run.get("curves", {})
        for ax, tag in zip(axes, ("codebook/active_codes", "codebook/window_active_codes", "codebook/recon")):
            points = np.array(curves.get(tag, []), dtype=float).reshape(-1, 2)
            if len(points):
                ax.plot(points[:, 0], points[:, 1], line, color=colour, label=label,
                        marker="." if len(points) < 30 else None)
        resampled = np.array(curves.get("codebook/resampled_codes", []), dtype=float).reshape(-1, 2)
        hits = resampled[resampled[:, 1] > 0] if len(resampled) else resampled
        if len(hits):
            axes[1].scatter(hits[:, 0], hits[:, 1], color=colour, marker="x", s=20, label=f"codes resampled ({label})")
    for ax in axes[:2]:
        ax.axhline(0.95 * codes, color="grey", linestyle="--", linewidth=1, label="95% of the codes")
        ax.set_ylim(0, codes * 1.05)
    titles = ("active codes per batch", "codes active since the last check (window); x: resampled",
              "skill auto-encoder reconstruction loss")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[2].set_yscale("log")
    return _save(fig, out, "resampling.png")


def plot_diversity(section: dict[str, Any], out: Path) -> str | None:
    policies = section.get("policies", {})
    if not policies:
        return None
    fig, axes = _figure(15, 4.5, 3)
    colours = {"skills": "C0", "random": "C3", "explore": "C2"}
    for name, stats in policies.items():
        final = np.array(stats.get("final", []), dtype=float).reshape(-1, 2)
        axes[0].scatter(final[:, 0], final[:, 1], s=14, alpha=0.7, color=colours.get(name, "C7"), label=name)
        for path in stats.get("paths", [])[:64]:
            path = np.array(path, dtype=float).reshape(-1, 2)
            axes[1].plot(path[:, 0], path[:, 1], color=colours.get(name, "C7"), alpha=0.25, linewidth=0.8)
        axes[1].plot([], [], color=colours.get(name, "C7"), label=name)
    names = list(policies)
    distances = [policies[n]["mean_pairwise_distance"] for n in names]
    cells = [policies[n]["cells"] for n in names]
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, distances, 0.4, color=[colours.get(n, "C7") for n in names],
                label="mean pairwise distance (m)")
    twin = axes[2].twinx()
    twin.bar(x + 0.2, cells, 0.4, color=[colours.get(n, "C7") for n in names], alpha=0.45, hatch="//",
             label="cells visited")
    axes[2].set_xticks(x, names)
    axes[2].set_ylabel("mean pairwise distance of final positions (m)")
    twin.set_ylabel(f"({CELL_X} m x {CELL_Z} m) cells visited")
    axes[0].set_title("final torso positions", fontsize=10)
    axes[1].set_title("torso paths", fontsize=10)
    axes[2].set_title("spread (solid) and cells visited (hatched)", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("torso x (m)")
        ax.set_ylabel("torso height (m)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, out, "diversity.png")


def plot_sparse(section: dict[str, Any], out: Path) -> str | None:
    tasks = {t: e for t, e in section.get("tasks", {}).items() if e.get("skills") and e.get("random")}
    if not tasks:
        return None
    fig, (ax,) = _figure(6, 4)
    x = np.arange(len(tasks))
    for offset, policy, colour in ((-0.2, "skills", "C0"), (0.2, "random", "C3")):
        values = [e[policy][e["metric"]] for e in tasks.values()]
        bars = ax.bar(x + offset, values, 0.4, color=colour,
                      label="pretrained skills" if policy == "skills" else "random actions")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, [f"{t}\n({'goals' if e.get('goals') else 'episodes'}: {e['metric']})"
                      for t, e in tasks.items()])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title("sparse rewards found zero-shot", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "sparse.png")


def plot_planning(section: dict[str, Any], out: Path) -> str | None:
    agents = {a: e for a, e in section.get("agents", {}).items() if e.get("plan") and e.get("random")}
    if not agents:
        return None
    fig, (ax,) = _figure(6, 4)
    x = np.arange(len(agents))
    for offset, policy, colour in ((-0.2, "plan", "C0"), (0.2, "random", "C3")):
        values = [e[policy]["normalised_distance"] for e in agents.values()]
        errors = [e[policy].get("normalised_distance_se", 0.0) for e in agents.values()]
        ax.bar(x + offset, values, 0.4, yerr=errors, capsize=4, color=colour,
               label="planning" if policy == "plan" else "random skills")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="standing still")
    ax.set_xticks(x, list(agents))
    ax.set_ylabel("normalised distance to the goal (lower is better)")
    ax.set_title("point_mass_nav, zero-shot", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "planning.png")


def _plot(fn: Callable[[dict[str, Any], Path], str | None], section: dict[str, Any], out: Path,
          lines: list[str], what: str) -> None:
    try:
        path = fn(section, out)
    except Exception as e:  # noqa: BLE001 - a plot that fails is reported, the tables stay
        lines += [f"(the plot could not be drawn: {type(e).__name__}: {e})", ""]
        return
    if path:
        lines += [f"![{what}]({path})", ""]


def _needs(results: dict[str, Any]) -> dict[str, str]:
    """For each stage, the scale its target likely needs, in hours on this machine at the measured
    update costs."""
    cal = results.get("calibration", {})
    pre, ft = cal.get("pretrain_update_s"), cal.get("finetune_update_s")
    if not pre or not ft:
        return {s: "more frames than this budget gave" for s in STAGES}
    small = (100_000 - 4000) / 10 * pre  # configs/size/small.yaml's own pretraining length
    return {
        "resampling": f"more updates: the paper finds ~0% unused codes after 10k updates, {_hours(10_000 * pre)} "
                      f"here at {pre:.2f} s per pretraining update (or a GPU learner)",
        "diversity": f"longer pretraining, e.g. the small preset's own 100k frames ({_hours(small)} here) or the "
                     f"paper's 2M frames",
        "sparse": f"longer pretraining on each domain (the paper: 2M frames; 100k frames would take {_hours(small)} "
                  f"here per domain) and more goals and episodes",
        "finetune": (f"the paper's protocol (without --quick): 100k fine-tuning frames per run ({_hours(9600 * ft)} "
                     f"per run here), and a longer pretraining (100k frames: {_hours(small)} here)"
                     if results.get("stages", {}).get("finetune", {}).get("scale", {}).get("protocol") != "paper" else
                     "more seeds (the paper: 10) or snapshots, or a longer pretraining (the paper: 2M frames); see "
                     "what the measurements point to above"),
        "planning": "more pretraining frames on point_mass_nav (DADS: the 20k frames of docs/dads-and-planning.md plan to Delta 0.35; "
                    "Choreographer's world model and codebook: likely 50-100k frames)",
    }


def write_report(results: dict[str, Any], out: Path) -> Path:
    """report.md (and plots/*.png) in `out` from a results dict as `run` records it: every stage's
    section with its scale, numbers, plot and verdict, a failed or skipped stage with its error.
    Pure: reads nothing but `results` (and links the pictures it names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    needs = _needs(results)
    budget = results.get("budget", {})
    cal = results.get("calibration", {})
    estimates = results.get("estimates") or cal
    machine = results.get("machine", {})
    selected = results.get("selected", list(STAGES))
    stages = results.get("stages", {})
    seeds = ", ".join(map(str, results.get("finetune_seeds", FINETUNE_SEEDS)))
    lines = ["# choreo bench learning: does the system learn?", ""]
    lines += [f"`{results.get('command', 'choreo bench learning')}`, started {results.get('started', '?')}: "
              f"budget {budget.get('minutes', 0):g} minutes, took {fmt_s(results.get('elapsed_s'))}, on "
              f"{machine.get('cpus', '?')} CPUs (the learner on {machine.get('learner_device', 'auto')} with "
              f"{machine.get('learner_threads', '?')} torch threads; {'a GPU' if machine.get('gpu') else 'no GPU'}). "
              f"Size preset `{results.get('preset', PRESET)}` "
              f"(configs/size/{results.get('preset', PRESET)}.yaml), fixed seeds (pretraining and evaluations "
              f"{results.get('seed', SEED)}, fine-tuning {seeds}), "
              f"every run in one process (`--local`). Every number is in `results.json`; each run's directory "
              f"(config, TensorBoard, checkpoints) is under `runs/`, its output under `logs/`.", ""]
    if results.get("interrupted"):
        lines += ["**The bench was interrupted**: the stages below stop where it was.", ""]

    lines += ["## Summary", ""]
    rows = []
    for i, stage in enumerate(selected, 1):
        section = stages.get(stage, {})
        target = section.get("target", {})
        status = section.get("status", "not run")
        if status in ("ok", "partial") or target.get("met") is not None:
            verdict = _target_verdict(target) + ("" if status == "ok" else f" (stage {status})")
        else:
            verdict = f"**{status}**"
        rows.append([f"{i}", TITLES[stage], _summary_measure(stage, section), target.get("text", "-"), verdict])
    lines += _table(["#", "claim", "measured", "target", "verdict"], rows)

    lines += ["## Budget", ""]
    def costs(c: dict[str, Any]) -> str:
        return (f"pretraining {_num(c.get('pretrain_update_s'))} s, fine-tuning {_num(c.get('finetune_update_s'))} s, "
                f"DADS {_num(c.get('dads_update_s'), 3)} s")

    lines += [f"The budget is shared by the stages in fixed fractions of the time left when each starts "
              f"(so time a stage leaves unused goes to the later ones); each stage sizes its runs from the learner's "
              f"update cost, timed at the start on random batches ({fmt_s(cal.get('seconds'))}: {costs(cal)} per "
              f"update) and re-estimated from the runs that were mostly updates (at the end: {costs(estimates)}). "
              f"A run that overruns its plan by half is stopped (final checkpoint) and reported as cut short.", ""]
    rows = []
    for stage in selected:
        spent = budget.get("stages", {}).get(stage, {})
        share = ("outside (fixed protocol)" if stage in budget.get("outside", [])
                 else f"{budget.get('fractions', {}).get(stage, 0):.0%}")
        rows.append([stage, share, "-" if stage in budget.get("outside", []) else fmt_s(spent.get("allotted_s")),
                     fmt_s(spent.get("used_s")), stages.get(stage, {}).get("status", "not run")])
    lines += _table(["stage", "fraction", "allotted", "used", "status"], rows)

    writers = {"resampling": _report_resampling, "diversity": _report_diversity, "sparse": _report_sparse,
               "finetune": _report_finetune, "planning": _report_planning}
    for i, stage in enumerate(selected, 1):
        section = stages.get(stage)
        lines += [f"## {i}. {TITLES[stage]}", ""]
        if section is None:
            lines += ["Not run (the bench stopped before this stage).", ""]
            continue
        status = section.get("status")
        if status in ("failed", "skipped", "interrupted", "running", "partial"):
            what = {"running": "This stage did not finish", "partial": "Part of this stage failed"}.get(
                status, f"This stage {status}")
            lines += [f"**{what}**" + (f": `{section.get('error')}`" if section.get("error") else ""), ""]
            if section.get("traceback"):
                lines += ["<details><summary>traceback</summary>", "", "```", section["traceback"].rstrip(), "```",
                          "", "</details>", ""]
        try:
            writers[stage](section, out, lines)
        except Exception as e:  # noqa: BLE001 - a malformed section is reported, the others are written
            lines += [f"(this section could not be written from the results: {type(e).__name__}: {e})", ""]
        target = section.get("target")
        if target:
            met = target.get("met")
            lines += [f"**Target**: {target.get('text')}. {_target_verdict(target)}."]
            if met is False:
                lines += [f"Missed at this scale; it likely needs {needs.get(stage)}."]
            elif met is None:
                lines += ["Not measured as a whole: numbers it needs are missing (see above)."]
            lines += [""]
        for note in section.get("notes", []):
            lines += [f"- note: {note}"]
        if section.get("notes"):
            lines += [""]
        if stage in budget.get("outside", []):
            lines += [f"Stage time: {fmt_s(section.get('seconds'))}, outside the budget (a fixed protocol).", ""]
        else:
            lines += [f"Stage time: {fmt_s(section.get('seconds'))} of {fmt_s(section.get('allotted_s'))} allotted.",
                      ""]
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _summary_measure(stage: str, section: dict[str, Any]) -> str:
    try:
        if stage == "resampling":
            runs = section["runs"]
            codes = section["scale"]["num_codes"]
            on, off = runs.get("with", {}).get("final", {}), runs.get("without", {}).get("final", {})
            return (f"{_num(on.get('window_active_codes'), 0)} of {codes} codes active at the last check; per batch "
                    f"{_num(on.get('active_codes'), 1)} with resampling, {_num(off.get('active_codes'), 1)} without")
        if stage == "diversity":
            p = section["policies"]
            explore = p.get("explore", {}).get("mean_pairwise_distance")
            return (f"spread {_num(p['skills']['mean_pairwise_distance'])} m (skills) vs "
                    f"{_num(p['random']['mean_pairwise_distance'])} m (random), {_num(explore)} m (explore); "
                    f"cells {p['skills']['cells']} vs {p['random']['cells']}")
        if stage == "sparse":
            parts = []
            for task, e in section["tasks"].items():
                if e.get("skills") and e.get("random"):
                    m = e["metric"]
                    parts.append(f"{task}: {_num(e['skills'][m])} vs {_num(e['random'][m])} random")
                else:
                    parts.append(f"{task}: {e.get('status')}")
            return "; ".join(parts)
        if stage == "finetune":
            analysis = section["analysis"]
            half, last = analysis["claim"]["second_half"], analysis["claim"]["last"]
            parts = [f"second half {_ms(half['better'])} fine-tuned vs {_ms(half['worse'])} scratch",
                     f"at {_num(section['scale']['frames'])} frames {_ms(last['better'])} vs {_ms(last['worse'])}"]
            for label, s in analysis["snapshots"].items():
                best = (s.get("held") or {}).get("best_remeasured", {}).get("mean")
                if best is not None:
                    parts.append(f"{label}: best held skill {best:.1f} on fresh episodes")
            return "; ".join(parts)
        if stage == "planning":
            parts = []
            for name, e in section["agents"].items():
                if e.get("plan") and e.get("random"):
                    parts.append(f"{name}: Delta {e['plan']['normalised_distance']:.2f} vs "
                                 f"{e['random']['normalised_distance']:.2f} random")
                else:
                    parts.append(f"{name}: {e.get('status')}")
            return "; ".join(parts)
    except (KeyError, TypeError):
        pass
    return "-"


def _cut(run: dict[str, Any]) -> str:
    """How a run ended: complete, or cut short by the watchdog (with the machine's load then)."""
    if not run.get("cut_short"):
        return "complete"
    load = run.get("load_1m")
    return "cut short" + (f" (load average {load:.1f})" if load is not None else "")


def _run_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    return [[label, _num(r.get("frames")), _num(r.get("updates")), fmt_s(r.get("seconds")), _cut(r),
             f"`{r.get('run_dir')}`"] for label, r in runs if r]


def _report_resampling(section: dict[str, Any], out: Path, lines: list[str]) -> None:
    scale = section.get("scale", {})
    lines += [f"The paper's Figure 7: with more than 32 codes, code resampling keeps nearly every code in use "
              f"(~0% unused after 10k steps) and lowers the reconstruction loss. Here: two pretrainings on "
              f"{scale.get('task')} from {scale.get('obs')} at the `{scale.get('preset', PRESET)}` size, "
              f"{_num(scale.get('planned_frames'))} frames planned ({_num(scale.get('warm_frames'))} of random "
              f"warm-up), seed {scale.get('seed')}, {scale.get('num_codes')} codes, resampling every "
              f"{scale.get('resample_every')} skill updates in one and never in the other "
              f"(`agent.choreographer.resample_codes=false`: its checks count the active codes and re-place "
              f"none). From their TensorBoard scalars, logged every "
              f"{scale.get('log_every')} updates: `codebook/active_codes` (distinct codes chosen in a batch), "
              f"`codebook/window_active_codes` (codes chosen since the last resampling check), "
              f"`codebook/resampled_codes`, `codebook/recon`.", ""]
    runs = section.get("runs", {})
    lines += _table(["run", "frames", "updates", "time", "ended", "directory"],
                    _run_rows([("with resampling", runs.get("with")), ("without resampling", runs.get("without"))]))
    rows = []
    for label, key in (("with resampling", "with"), ("without resampling", "without")):
        final = runs.get(key, {}).get("final")
        if final:
            rows.append([label, _num(final.get("active_codes"), 1), _num(final.get("window_active_codes"), 1),
                         _num(final.get("resampled_codes"), 0), _num(final.get("recon"), 4)])
    if rows:
        lines += ["At the end (active codes per batch: the mean of the last 5 logged batches; window: at the last "
                  "resampling check, or the last logged value):", ""]
        lines += _table(["run", "active codes per batch", "window active codes", "codes resampled (total)",
                         "skill reconstruction loss"], rows)
    _plot(plot_resampling, section, out, lines, "active codes over updates")


def _report_diversity(section: dict[str, Any], out: Path, lines: list[str]) -> None:
    scale = section.get("scale", {})
    modes = scale.get("modes", {})
    lines += [f"The {scale.get('episodes')} skills of the walker snapshot (`{scale.get('snapshot')}`, "
              f"{_num(scale.get('snapshot_frames'))} frames) each played once in the real walker_stand environment "
              f"for {scale.get('steps')} steps (skill policy, {modes.get('skills', 'mode')} actions), against as many "
              f"episodes of uniform random actions and of the exploration policy ({modes.get('explore', 'sample')}d "
              f"actions), environment i reset with the same seed for each. Measured on the torso's x position and "
              f"height (`physics.named.data.xpos['torso']`): the mean pairwise distance of the final positions, and "
              f"the ({scale.get('cell', [CELL_X, CELL_Z])[0]} m x {scale.get('cell', [CELL_X, CELL_Z])[1]} m) cells "
              f"visited over all steps and at the end.", ""]
    rows = []
    for name, stats in section.get("policies", {}).items():
        rows.append([name, _num(stats.get("mean_pairwise_distance"), 3), _num(stats.get("cells")),
                     _num(stats.get("final_cells")),
                     f"{stats.get('final_x_mean', 0):.2f} ± {stats.get('final_x_std', 0):.2f}",
                     f"{stats.get('final_height_mean', 0):.2f} ± {stats.get('final_height_std', 0):.2f}"])
    if rows:
        lines += _table(["policy", "mean pairwise distance (m)", "cells visited", "final cells",
                         "final x (mean ± sd, m)", "final height (mean ± sd, m)"], rows)
    _plot(plot_diversity, section, out, lines, "skill diversity")
    vis = section.get("visualize")
    if vis:
        if vis.get("error"):
            lines += [f"`choreo visualize` failed: `{vis['error']}`", ""]
        else:
            images = vis.get("images", [])
            gifs = vis.get("gifs", [])
            named = f" and {', '.join(f'`{i}`' for i in images)}" if images else ""
            lines += [f"`choreo visualize` ({vis.get('steps')} steps per skill) wrote {len(gifs)} skill GIFs into "
                      f"`{vis.get('dir')}/`{named}:", ""]
            lines += [f"![codebook]({i})" for i in images] + [""]
            lines += [" ".join(f"![skill]({g})" for g in gifs[:16]), ""]


def _report_sparse(section: dict[str, Any], out: Path, lines: list[str]) -> None:
    scale = section.get("scale", {})
    rule = scale.get("rule", f"a step paying >= {scale.get('threshold', 1e-4):g}")
    lines += [f"The paper's Table 1: the pretrained skills, without any update, find sparse rewards ({rule}) at "
              f"least as often as random actions. Here each domain gets a short pretraining from states, then "
              f"`choreo evaluate` plays the skills (Meta-World: a random one every {scale.get('skill_every')} steps; "
              f"Jaco: one an episode; the reference's protocol) and uniform random actions. **Fewer goals and "
              f"episodes than the paper** ({scale.get('paper')}): Meta-World reach goal set "
              f"{scale.get('goal_set')}, goals {scale.get('goals')} with {scale.get('episodes_per_goal')} episodes "
              f"each (success: the mean over goals of each goal's success rate; beside it the goals found in any "
              f"episode); Jaco reach top-left, {scale.get('jaco_episodes')} episodes (success: the fraction of "
              f"episodes that succeeded).", ""]
    rows, runs = [], []
    for task, entry in section.get("tasks", {}).items():
        runs.append((f"{task} pretraining", entry.get("pretrain")))
        if entry.get("status") == "failed":
            rows.append([task, "failed", entry.get("error", ""), "", "", ""])
            continue
        metric = entry.get("metric")
        for policy in ("skills", "random"):
            s = entry.get(policy)
            if s:
                if "goals_found_any" in s:
                    found = f"{s.get('goals_found_any')} of {s.get('goals')} goals in any episode"
                elif "goals_found" in s:  # results written before the reference's protocol
                    found = f"{s.get('goals_found')} of {s.get('goals')} goals"
                else:
                    found = f"{s.get('episodes_found')} of {s.get('episodes')} episodes"
                rows.append([task, policy, _num(s.get(metric), 3), found, _num(s.get("episode_success"), 3),
                             _num(s.get("mean_return"), 1)])
    lines += _table(["pretraining", "frames", "updates", "time", "ended", "directory"], _run_rows(runs))
    if rows:
        lines += _table(["task", "policy", "success", "found", "episodes that succeeded", "mean return"], rows)
    _plot(plot_sparse, section, out, lines, "sparse rewards found")


def _ms(stats: dict[str, Any] | None, digits: int = 1) -> str:
    """mean ± s.e. (n) of a `mean_se` dict."""
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['se']:.{digits}f} ({stats['n']})"


def _report_finetune(section: dict[str, Any], out: Path, lines: list[str]) -> None:
    scale = section.get("scale", {})
    analysis = section.get("analysis") or {}
    protocol = scale.get("protocol") == "paper"
    lines += [f"Fine-tuning (`choreo finetune`, each run `--local`) on {scale.get('task')} from each snapshot and the "
              f"same protocol from random weights (`--from-scratch`), seeds "
              f"{', '.join(map(str, scale.get('seeds', [])))}: {_num(scale.get('frames'))} frames per run "
              f"({_num(scale.get('warm_frames'))} before the first update), an evaluation of "
              f"{scale.get('eval_episodes')} episodes (mean actions) at frame 0 and every "
              f"{_num(scale.get('eval_every'))} frames; {scale.get('parallel')} run(s) at a time. "
              + ("The paper's protocol for the fine-tuning budget (configs/mode/finetune.yaml at the "
                 f"`{scale.get('preset', PRESET)}` size). " if protocol else
                 "**`--quick`: runs scaled to the budget**, far below the paper's fine-tuning budget. ")
              + f"The paper: {scale.get('paper')}. A control run from the first snapshot keeps the executor "
              f"(skill actor) frozen (`agent.finetune.freeze_skills=true`). Beside the curves, on each snapshot: every "
              f"one of its {scale.get('num_skills')} skills held for one episode (mean actions); the best and the "
              f"top {scale.get('top')}, chosen on those episodes, measured again on {scale.get('remeasure_episodes')} "
              f"fresh episodes each (the maximum of many single episodes is partly luck); the median of all; "
              f"uniform random actions over {scale.get('random_episodes')} episodes.", ""]
    snapshots = section.get("snapshots", [])
    if snapshots:
        lines += _table(["snapshot", "file", "pretraining", "status"],
                        [[e["label"], f"`{e.get('path')}`",
                          f"{_num(e.get('frames'))} frames, {_num(e.get('updates'))} updates, size "
                          f"`{e.get('size')}`, {e.get('task')} from {e.get('obs')}, seed {e.get('seed')}",
                          e.get("status", "-") + (f": {e['error']}" if e.get("error") else "")] for e in snapshots])
    runs = section.get("runs", [])
    start = scale.get("second_half_from", 0)
    if runs:
        lines += _table(["run", "snapshot", "seed", "frames", "updates", "time", "second half", "last evaluation",
                         "directory"],
                        [[r.get("start"), r.get("snapshot") or "-", str(r.get("seed")), _num(r.get("frames")),
                          _num(r.get("updates")),
                          fmt_s(r.get("seconds")) + (f" ({_cut(r)})" if r.get("cut_short") else ""),
                          _num(second_half(r["curve"], start), 1) if r.get("curve") else r.get("status", "-"),
                          _num(r.get("final_return"), 1),
                          f"`{r.get('run_dir')}`" if r.get("run_dir") else f"failed: {r.get('error')}"]
                         for r in runs])
    claim = analysis.get("claim")
    if claim:
        lines += [f"**Claim 4, over seeds and snapshots** (mean ± standard error (runs); second half: each run's "
                  f"mean of its evaluations from {_num(start)} frames on):", ""]
        rows = []
        for what, key in (("second half of the budget", "second_half"), ("last evaluation", "last")):
            c = claim[key]
            rows.append([what, _ms(c["better"]), _ms(c["worse"]), _num(c["difference"], 1),
                         _num(None if c["se"] is None else 2 * c["se"], 1), _verdict(c["met"])])
        for label, s in analysis.get("snapshots", {}).items():
            if len(analysis.get("snapshots", {})) > 1:
                for what, key in (("second half", "second_half"), ("last evaluation", "last")):
                    c = s["claim"][key]
                    rows.append([f"{label} alone, {what}", _ms(c["better"]), _ms(c["worse"]),
                                 _num(c["difference"], 1), _num(None if c["se"] is None else 2 * c["se"], 1),
                                 _verdict(c["met"])])
        lines += _table(["", "fine-tuned", "from scratch", "difference", "2 s.e.", "above by 2 s.e."], rows)
    rows = []
    for label, s in analysis.get("snapshots", {}).items():
        h = s.get("held")
        if not h:
            continue
        best_top = h.get("best_of_top_remeasured") or {}
        rows.append([label, f"skill {h['best']}: {h['best_selection']:.1f} -> {_ms(h['best_remeasured'])}",
                     f"{h['top_selection']:.1f} -> {_ms(h['top_remeasured'])}",
                     f"skill {best_top.get('skill')}: {_ms(best_top)}" if best_top else "-",
                     _num(h["median"], 1), _ms(s.get("random")), _ms(s.get("finetune_last")),
                     _verdict((s.get("versus_held") or {}).get("met"))])
    if rows:
        lines += ["**Held skills and random actions** (selection episode -> fresh episodes, mean ± s.e. (episodes)); "
                  "the last column: fine-tuned (last evaluation) at least as good as the best skill measured again:",
                  ""]
        lines += _table(["snapshot", "best skill", f"top {scale.get('top')}", f"best of the top {scale.get('top')} "
                         "on fresh episodes", "median of all", "random actions", "fine-tuned (last)",
                         "fine-tuned >= best held"], rows)
    _plot(plot_finetune, section, out, lines, "fine-tuning curves")
    rows = []
    for label, s in analysis.get("snapshots", {}).items():
        for mode in ("finetune", "freeze"):
            for p in s.get(f"picks_{mode}", []):
                if p.get("steps"):
                    rows.append([label, "fine-tuned" if mode == "finetune" else "frozen executor", _num(p["frame"]),
                                 _num(p.get("distinct_per_episode"), 1),
                                 f"{p['share_top']:.0%} ({p['chance_top']:.0%})",
                                 f"skill {p['most_picked']} ({p['most_picked_share']:.0%}; held rank "
                                 f"{p['most_picked_rank']})", f"{p['weighted_held']:.1f} ({p['mean_held']:.1f})"])
    if rows:
        lines += ["**What the meta-controller chooses** in the evaluation episodes (mean actions: its most likely "
                  "skill at every step once the reward gate is open; at frame 0 the gate is closed and random skills "
                  f"are held {scale.get('random_skill_every')} steps each), against the skills held still on the "
                  "snapshot: the share of its steps on the held top 5 (a uniform choice's in brackets), its most "
                  "chosen skill, and the held return of its choices weighted by their steps (the mean of all skills in "
                  "brackets):", ""]
        lines += _table(["snapshot", "run", "frame", "skills per episode", f"steps on the top {scale.get('top')}",
                         "most chosen", "held return of the choices"], rows)
        _plot(plot_finetune_picks, section, out, lines, "skills chosen by the meta-controller")
    rows = []
    for label, s in analysis.get("snapshots", {}).items():
        for d in s.get("drift", []):
            rows.append([label, d["run"], str(d["skills"]), f"{d['mean_before']:.1f} -> {d['mean_after']:.1f}",
                         _num(d["mean_change"], 1), _num(d["mean_abs_change"], 1), _num(d["rank_correlation"], 2),
                         f"{d['top_before']:.1f} -> {d['top_after']:.1f}" if "top_before" in d else "-"])
    if rows:
        lines += ["**Executor drift**: the skill actors of the fine-tuned agent (its world model's filter too) held "
                  "as the snapshot's were, the same skills on the same episodes; the frozen-executor run is the "
                  "control, where only the world model and the meta-controller changed:", ""]
        lines += _table(["snapshot", "run", "skills", "mean held return", "mean change", "mean |change|",
                         "rank correlation", f"snapshot's top {scale.get('top')}"], rows)
        _plot(plot_finetune_drift, section, out, lines, "executor drift")
    reading = finetune_reading(section)
    if reading:
        lines += ["**What the measurements point to**, set against the reference's meta-controller "
                  f"({scale.get('reference', REFERENCE_META)}), which this one reproduces:", ""]
        lines += [f"- {r}" for r in reading] + [""]
    for rep in section.get("reports", []):
        if rep.get("rc") == 0:
            lines += [f"`choreo report` on {rep.get('label')}'s runs and those from scratch: "
                      f"[{rep.get('markdown')}]({rep.get('markdown')}), [{rep.get('plot')}]({rep.get('plot')}).", ""]
        else:
            lines += [f"`choreo report` on {rep.get('label')}'s runs and those from scratch failed: "
                      f"`{rep.get('text', '').strip()}`", ""]


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def _sentence(prefix: str, text: str) -> str:
    text = prefix + text
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def pick_lean(pick: dict[str, Any]) -> str:
    """How much the meta-controller's choices favour the held top skills: "concentrate", "lean" or
    "none", from the share of its steps there above a uniform choice's, as a fraction of the most
    it could be above (1 - chance), so that the words mean the same for any number of skills."""
    chance = pick["chance_top"]
    excess = (pick["share_top"] - chance) / max(1.0 - chance, 1e-9)
    return "concentrate" if excess >= 0.5 else "lean" if excess >= 0.15 else "none"


def finetune_reading(section: dict[str, Any]) -> list[str]:
    """Sentences on what the stage's figures point to, each conditional on them (none where a
    figure is missing)."""
    analysis = section.get("analysis") or {}
    scale = section.get("scale", {})
    out: list[str] = []
    claim = analysis.get("claim", {})
    half, last = claim.get("second_half", {}), claim.get("last", {})
    if half.get("difference") is not None and last.get("difference") is not None:
        d, two = half["difference"], 2 * (half["se"] or 0.0)
        where = f"over the second half ({_signed(d)}, 2 s.e. {two:.1f}) and at the last evaluation " \
                f"({_signed(last['difference'])}, 2 s.e. {2 * (last['se'] or 0.0):.1f})"
        if half["met"] is None or last["met"] is None:
            out.append(f"Fine-tuned minus scratch {where}; with one run on a side a standard error says nothing, so "
                       f"claim 4 is not decided (more seeds: `--seeds`).")
        elif half["met"] and last["met"]:
            out.append(f"Fine-tuning from the snapshot beats learning from scratch by more than two standard errors "
                       f"{where}: claim 4 holds at this budget.")
        elif half["met"] or last["met"]:
            out.append(f"Fine-tuning is ahead of learning from scratch {where}, by two standard errors on one of the "
                       f"two only: claim 4 holds in part.")
        elif d > 0:
            out.append(f"Fine-tuning is ahead of learning from scratch {where}, but within two standard errors: "
                       f"with these seeds the curves are not told apart.")
        else:
            out.append(f"Fine-tuning is not ahead of learning from scratch {where}.")
    snaps = analysis.get("snapshots", {})
    if len(snaps) > 1:
        diffs = {label: s["claim"]["second_half"]["difference"] for label, s in snaps.items()
                 if s["claim"]["second_half"]["difference"] is not None}
        if len(diffs) > 1:
            spread_ = max(diffs.values()) - min(diffs.values())
            out.append(f"Per snapshot, over the second half: {', '.join(f'{k} {_signed(v)}' for k, v in diffs.items())}"
                       + (f"; the snapshots differ by {spread_:.1f}, more than the pooled two standard errors "
                          f"({2 * (half.get('se') or 0.0):.1f}): the answer depends on the snapshot."
                          if spread_ > 2 * (half.get("se") or 0.0) else "; they agree within the pooled two standard "
                                                                         "errors."))
    for label, s in snaps.items():
        h, versus = s.get("held"), s.get("versus_held") or {}
        if not h or h["best_remeasured"]["mean"] is None:
            continue
        prefix = f"{label}: " if len(snaps) > 1 else ""
        drop = h["best_selection"] - h["best_remeasured"]["mean"]
        text = (f"the best held skill returns {h['best_selection']:.1f} on the episode it was chosen on and "
                f"{h['best_remeasured']['mean']:.1f} on fresh ones"
                + (f" (its one episode overstated it by {drop:.1f})" if drop > 0 else "")
                + f"; the median skill {h['median']:.1f}")
        if s.get("random", {}).get("mean") is not None:
            r = s["random"]["mean"]
            text += f", random actions {r:.1f} ({'above' if r > h['median'] else 'below'} the median skill)"
        tuned = versus.get("finetune_last")
        if tuned is not None:
            text += (f". Fine-tuned, the agent ends at {tuned:.1f}: "
                     + ("above the best skill held still, so fine-tuning adds to what the single best skill gives."
                        if versus.get("met") else
                        "below the best skill held still, so the meta-controller has not found a way of acting as "
                        "good as holding that one skill."))
        out.append(_sentence(prefix, text))
        picks = [p for p in s.get("picks_finetune", []) if p.get("steps") and p["frame"] > 0]
        if picks:
            p = picks[-1]
            how = {"concentrate": "its choices concentrate on the skills that do best held still",
                   "lean": "its choices lean towards the skills that do best held still",
                   "none": "its choices do not favour the skills that do best held still"}[pick_lean(p)]
            switching = p.get("distinct_per_episode")
            text = (f"at the last evaluation the meta-controller spends {p['share_top']:.0%} of its steps on "
                    f"the held top {scale.get('top', TOP_SKILLS)} (a uniform choice: {p['chance_top']:.0%}): {how}; "
                    f"its most chosen skill ranks {p['most_picked_rank']} of {len(p['counts'])} held still")
            if switching is not None:
                text += (f", and an episode uses {switching:.1f} skills on average"
                         + (" (a choice at every step, as in the reference, settles on few)" if switching <= 3 else
                            " (a choice at every step, as in the reference, switches among many)"))
            out.append(_sentence(prefix, text))
        tuned_drift = [d for d in s.get("drift", []) if d["start"] == "finetune"]
        frozen = [d for d in s.get("drift", []) if d["start"] == "freeze"]
        if tuned_drift:
            change = float(np.mean([d["mean_change"] for d in tuned_drift]))
            moved = float(np.mean([d["mean_abs_change"] for d in tuned_drift]))
            rhos = [d["rank_correlation"] for d in tuned_drift if d["rank_correlation"] is not None]
            text = (f"held still after fine-tuning, the skills return {_signed(change)} on average against "
                    f"the snapshot's (mean |change| {moved:.1f}"
                    + (f", rank correlation {np.mean(rhos):.2f}" if rhos else "") + ")")
            if change > 0 and moved > 0:
                text += (": the skills themselves got better at the task, so part of any gain is the executor's, not "
                         "the choice among skills")
            elif change < 0:
                text += ": the executor moved away from what its pretrained skills did"
            if frozen:
                f = frozen[0]
                text += (f"; with the executor frozen, {_signed(f['mean_change'])} (mean |change| "
                         f"{f['mean_abs_change']:.1f}): "
                         + ("most of the drift comes from training the executor, not from the world model's features"
                            if moved > 1.5 * f["mean_abs_change"] else
                            "the frozen control moves about as much, so the features the skills act on move with "
                            "the world model"))
            out.append(_sentence(prefix, text))
        freeze = [r for r in section.get("runs", []) if r.get("start") == "freeze" and r.get("snapshot") == label
                  and r.get("final_return") is not None]
        tuned_runs = [r for r in section.get("runs", []) if r.get("start") == "finetune" and r.get("snapshot") == label
                      and r.get("final_return") is not None]
        if freeze and tuned_runs:
            f = freeze[0]
            same = [r for r in tuned_runs if r["seed"] == f["seed"]]
            if same:
                gap = f["final_return"] - same[0]["final_return"]
                out.append(_sentence(prefix, f"with the executor frozen the run ends at {f['final_return']:.1f}, "
                                             f"against {same[0]['final_return']:.1f} fine-tuned at the same seed "
                                             f"({_signed(gap)}; one seed)"))
    lasts = [s["picks_finetune"][-1] for s in snaps.values() if s.get("picks_finetune")
             and s["picks_finetune"][-1].get("steps") and s["picks_finetune"][-1]["frame"] > 0]
    if out and lasts:
        ahead = half.get("met") is True and last.get("met") is True
        leaning = all(pick_lean(p) != "none" for p in lasts)
        beats_held = all(s.get("versus_held", {}).get("met") for s in snaps.values())
        if leaning and beats_held:
            out.append("Together: the meta-controller uses the skills as the reference intends, choosing good ones and "
                       "ending above the best of them held still"
                       + (", and ahead of learning from scratch." if ahead else
                          "; that it is not also ahead of learning from scratch by two standard errors at both points "
                          "says the snapshot's head start is not resolved with these runs."))
        elif not leaning:
            gain = half.get("difference")
            out.append("Together: the meta-controller's choices do not single out the skills that do best held still"
                       + ("; what fine-tuning gains over learning from scratch looks more like the executor and the "
                          "world model learning the task than like a choice among skills"
                          if gain is not None and gain > 0 else
                          ", and fine-tuning gains nothing over learning from scratch here")
                       + ". Changes these figures suggest trying, each against the "
                       "reference's behaviour on the same seeds: holding a chosen skill for several steps, freezing "
                       "the executor, or starting from a skill ranked before acting (a search over skills in the first "
                       "frames as CIC does, IRM's matching of intrinsic and task rewards, or each skill's return "
                       "imagined under the learned reward once the gate opens).")
        else:
            out.append("Together: the meta-controller leans towards good skills but does not yet beat holding the best "
                       "one still; ranking the skills before acting (imagined returns under the learned reward, a "
                       "search over skills in the first frames, IRM) is the change these figures suggest trying first.")
    return out


def plot_finetune(section: dict[str, Any], out: Path) -> str | None:
    runs = [r for r in section.get("runs", []) if r.get("curve")]
    if not runs:
        return None
    analysis = section.get("analysis") or {}
    labels = [e["label"] for e in section.get("snapshots", [])] or [None]
    fig, axes = _figure(6 * len(labels), 4.2, len(labels))

    def band(ax: Any, members: list[dict[str, Any]], colour: str, label: str) -> None:
        for r in members:
            curve = np.array(r["curve"], dtype=float)
            ax.plot(curve[:, 0], curve[:, 1], color=colour, alpha=0.3, linewidth=0.8)
        frames = sorted({f for r in members for f, _ in r["curve"]})
        stats = [[v for r in members for f2, v in r["curve"] if f2 == f] for f in frames]
        mean = np.array([np.mean(v) for v in stats])
        se = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in stats])
        ax.plot(frames, mean, color=colour, marker="o", markersize=3, label=f"{label} ({len(members)} runs)")
        ax.fill_between(frames, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)

    for ax, label in zip(axes, labels):
        tuned = [r for r in runs if r["start"] == "finetune" and r.get("snapshot") == label]
        scratch = [r for r in runs if r["start"] == "scratch"]
        frozen = [r for r in runs if r["start"] == "freeze" and r.get("snapshot") == label]
        for members, colour, name in ((tuned, "C0", "fine-tuned"), (scratch, "C3", "from scratch"),
                                      (frozen, "C2", "executor frozen")):
            if members:
                band(ax, members, colour, name)
        s = analysis.get("snapshots", {}).get(label, {})
        h = s.get("held")
        lines = []
        if h and h["best_remeasured"]["mean"] is not None:
            lines.append((h["best_remeasured"]["mean"], "--", "C1", "best held skill, fresh episodes"))
        if h and h["top_remeasured"]["mean"] is not None:
            lines.append((h["top_remeasured"]["mean"], "-.", "C1", "top-5 held skills, fresh episodes"))
        if h:
            lines.append((h["median"], ":", "C7", "median held skill"))
        if s.get("random", {}).get("mean") is not None:
            lines.append((s["random"]["mean"], "--", "C7", "random actions"))
        for y, style, colour, name in lines:
            ax.axhline(y, linestyle=style, color=colour, linewidth=1, label=name)
        task = section.get("scale", {}).get("task", FINETUNE_TASK)
        ax.set_title(task + (f", snapshot {label}" if label else ""), fontsize=10)
        ax.set_xlabel("fine-tuning frames")
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, out, "finetune.png")


def plot_finetune_picks(section: dict[str, Any], out: Path) -> str | None:
    snaps = {label: s for label, s in (section.get("analysis") or {}).get("snapshots", {}).items()
             if s.get("picks_finetune") and s.get("held")}
    if not snaps:
        return None
    fig, axes = _figure(12, 4.2 * len(snaps), 2)
    if len(snaps) > 1:
        fig.clear()
        axes = list(fig.subplots(len(snaps), 2, squeeze=False).reshape(-1))
    for i, (label, s) in enumerate(snaps.items()):
        heat, line = axes[2 * i], axes[2 * i + 1]
        picks = s["picks_finetune"]
        top = s["held"]["top"]
        counts = np.array([p["counts"] for p in picks], dtype=float)  # [E, K]
        k = counts.shape[1]
        order = s["held"].get("order") or top + [c for c in range(k) if c not in top]
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = heat.imshow(shares[:, order].T, aspect="auto", cmap="viridis", origin="upper",
                            extent=(-0.5, len(picks) - 0.5, k - 0.5, -0.5))
        heat.set_xticks(range(len(picks)), [f"{p['frame'] // 1000}k" if p["frame"] % 1000 == 0 and p["frame"] else
                                            f"{p['frame']:,}" for p in picks], fontsize=7)
        heat.axhline(len(top) - 0.5, color="white", linewidth=0.8, linestyle="--")
        every = max(1, k // 8)
        heat.set_yticks(range(0, k, every), [str(r + 1) for r in range(0, k, every)], fontsize=7)
        heat.set_xlabel("evaluation (frames)")
        heat.set_ylabel(f"skills by held rank (1: best; dashed: top {len(top)})")
        heat.set_title(f"{label}: share of the meta-controller's steps per skill", fontsize=10)
        fig.colorbar(image, ax=heat, fraction=0.04)
        for mode, colour, name in (("finetune", "C0", "fine-tuned"), ("freeze", "C2", "executor frozen")):
            rows = [p for p in s.get(f"picks_{mode}", []) if p.get("steps")]
            if rows:
                line.plot([p["frame"] for p in rows], [p["share_top"] for p in rows], marker="o", color=colour,
                          label=name)
        line.axhline(picks[0]["chance_top"], color="C7", linestyle="--", linewidth=1, label="a uniform choice")
        line.set_ylim(0, 1.02)
        line.set_xlabel("fine-tuning frames")
        line.set_ylabel(f"share of steps on the held top {len(top)}")
        line.set_title(f"{label}: choices on the skills best held still", fontsize=10)
        line.grid(alpha=0.3)
        line.legend(fontsize="x-small")
    return _save(fig, out, "finetune_picks.png")


def plot_finetune_drift(section: dict[str, Any], out: Path) -> str | None:
    entries = {e["label"]: e for e in section.get("snapshots", []) if (e.get("held") or {}).get("returns")}
    runs = [r for r in section.get("runs", []) if r.get("held") and r.get("snapshot") in entries]
    if not runs:
        return None
    labels = sorted({r["snapshot"] for r in runs}, key=list(entries).index)
    fig, axes = _figure(5 * len(labels), 4.5, len(labels))
    for ax, label in zip(axes, labels):
        before_all = entries[label]["held"]["returns"]
        low, high = math.inf, -math.inf
        for r in [r for r in runs if r["snapshot"] == label]:
            before = [before_all[c] for c in r["held"]["codes"]]
            after = r["held"]["returns"]
            colour = "C2" if r["start"] == "freeze" else "C0"
            ax.scatter(before, after, s=12, alpha=0.6, color=colour,
                       label=f"{'executor frozen' if r['start'] == 'freeze' else 'fine-tuned'}, seed {r['seed']}")
            low, high = min(low, *before, *after), max(high, *before, *after)
        ax.plot([low, high], [low, high], color="C7", linestyle="--", linewidth=1, label="unchanged")
        ax.set_xlabel("held return, snapshot")
        ax.set_ylabel("held return, after fine-tuning")
        ax.set_title(f"{label}: each skill on the same episode", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, out, "finetune_drift.png")


def _report_planning(section: dict[str, Any], out: Path, lines: list[str]) -> None:
    scale = section.get("scale", {})
    lines += [f"Zero-shot model-predictive control over skills on {scale.get('task')} (`choreo plan`), "
              f"{scale.get('episodes')} episodes per row, each with a goal of its own: DADS plans with its skill "
              f"dynamics (pretrained with `algo=dads`), Choreographer over its codebook with its world model's "
              f"imagination (pretrained on the same task), each against random skills held as long. Metric: the "
              f"normalised distance Delta = mean_t ||g - u_t|| / ||g - u_0|| (1: standing still; lower is better). "
              f"Reference: {scale.get('reference')}.", ""]
    rows, runs = [], []
    for name, entry in section.get("agents", {}).items():
        runs.append((f"{name} pretraining", entry.get("pretrain")))
        if entry.get("status") == "failed":
            rows.append([name, "failed", entry.get("error", ""), "", ""])
            continue
        for policy in ("plan", "random"):
            s = entry.get(policy)
            if s:
                rows.append([name, "planning" if policy == "plan" else "random skills",
                             f"{s['normalised_distance']:.3f} ± {s.get('normalised_distance_se', 0):.3f}",
                             _num(s.get("final_distance"), 2), _num(s.get("mean_return"), 1)])
    lines += _table(["pretraining", "frames", "updates", "time", "ended", "directory"], _run_rows(runs))
    if rows:
        lines += _table(["agent", "policy", "normalised distance (± s.e.)", "final distance", "mean return"], rows)
    _plot(plot_planning, section, out, lines, "planning")


__all__ = ["run", "write_report", "plan_run", "RunPlan", "Budget", "spread", "log_every_for", "eval_sizes"]
