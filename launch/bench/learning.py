"""`choreo bench learning`: evidence that the system learns, at the `small` size, within a budget.

    choreo bench learning                              # 60 minutes, into runs/bench-learning-<time>/
    choreo bench learning --budget-minutes 180 --out learning-report
    choreo bench learning --budget-minutes 10 --stages resampling,planning
    choreo bench learning --threads 1                  # while other processes share the cores

It runs the whole pipeline (pretraining, pictures, zero-shot evaluation, fine-tuning, planning) at
`configs/size/small.yaml` with fixed seeds, scaled to the budget, one run after another in this
process (`--local`), and writes `report.md` (tables, PNG plots made with matplotlib's Agg canvas,
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
4. finetune    Fine-tuning the walker snapshot beats learning from scratch (`choreo finetune`,
               `--from-scratch`, seeds 0, 1, 2; walker_walk too from 120 budget minutes on;
               `choreo report` on their eval.jsonl). Target: on walker_stand, fine-tuned above
               scratch by more than two standard errors of the difference.
5. planning    Zero-shot planning on point_mass_nav (`choreo plan`): DADS planning with its skill
               dynamics, and planning over Choreographer's codebook with its world model, each
               against random skills. Target: a lower normalised distance than random skills by
               more than two standard errors of the difference.

Budget: after a short calibration (the learner's update of each kind timed on random batches),
each stage gets a fraction of the time left (`FRACTIONS`: 36%, 4%, 16%, 30%, 14%, re-planned over
the remaining stages whenever one starts, so time a stage leaves unused goes to the later ones).
Within a stage: resampling, half per run; diversity, 60% rollouts and 30% pictures; sparse, 40%
per pretraining and 20% for the evaluations; fine-tuning, an equal share per run, evaluations
included; planning, 15% DADS, 65% Choreographer, 20% the four planning evaluations. A run is sized
from the measured update cost: frames = warm-up + updates x the steps an update stands for at the
preset's replay ratio (the preset's warm-up, `replay.min_size`, unless the run cannot afford as
many steps after it). A run that overruns its plan by half is stopped like Ctrl-C (final
checkpoint; pretraining: its snapshot taken from that checkpoint) and reported as cut short,
with the machine's load average. A stage that fails is recorded with its error, and the others go
on; results.json and report.md are rewritten after every stage.

Where the runs execute: one process, every run `--local`. Measured here (2 cores, a 5,000-frame
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
WALK_MINUTES = 120.0
"""Budgets from this many minutes on also fine-tune on walker_walk."""
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


class Bench:
    def __init__(self, out: Path, budget: Budget, stream: Any, stages: Sequence[str], threads: int = 0) -> None:
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
        """Stage 1's snapshot (with resampling): what stages 2 and 4 start from."""
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

        return load_config([PRESET], [*overrides, *self.common])

    def plan(self, kind: str, overrides: Sequence[str], seconds: float, step_s: float) -> RunPlan:
        """The run of `kind` ("pretrain", "finetune", "dads") on `overrides` that fits `seconds`."""
        from choreo.launch.runtime.config import warmup_steps

        config = self.base_config(overrides)
        rb = config.replay
        steps_per_update = rb.batch_size * rb.batch_length / rb.samples_per_insert
        min_warm = max(300, 10 * rb.batch_length)
        return plan_run(seconds, getattr(self.costs, kind), steps_per_update, warmup_steps(config), min_warm, step_s,
                        config.env.action_repeat)

    def train(self, name: str, kind: str, overrides: Sequence[str], plan: RunPlan, step_s: float,
              logdir: Path | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
        """One run of `plan` (`choreo pretrain` or `choreo finetune`, `--local`) in
        `<logdir>/<name>/`, its output in logs/<name>.log. Returns what it did: frames, updates,
        seconds, its snapshot (pretraining), whether the watchdog cut it short."""
        from choreo.launch.runtime.local import run_local
        from choreo.launch.runtime.plan import resolve_plan
        from choreo.launch.runtime.rundir import RunDir
        from choreo.launch.runtime.run import check_snapshot
        from choreo.learner.learner import load_torch_file
        from choreo.learner.snapshot import save_snapshot

        logdir = logdir or self.runs
        ar = plan.action_repeat
        sized = [f"learner.total_frames={plan.frames}", f"replay.min_size={plan.warm * ar}",
                 f"replay.capacity={max(plan.steps, 1000)}"]
        if kind == "pretrain":
            sized += [f"learner.seed_frames={plan.warm * ar}", f"learner.snapshot_frames=[{plan.frames}]"]
        elif kind == "dads":
            sized += [f"learner.snapshot_frames=[{plan.frames}]"]
        else:
            sized += [f"eval.every_frames={plan.eval_every}", f"eval.episodes={plan.eval_episodes}"]
        config = self.base_config([*overrides, *sized, *NO_PICTURES, *extra, f"logdir={logdir}", f"run_name={name}"])
        if resolve_plan(config).start == "snapshot":
            check_snapshot(config)
        self.say(f"{self.stage}: {name}: {plan.frames:,} frames ({plan.warm * ar:,} warm-up), ~{plan.updates:,} "
                 f"updates, ~{fmt_s(plan.seconds)}")
        limit = max(WATCHDOG_FACTOR * plan.seconds, plan.seconds + WATCHDOG_SLACK_S)
        start = time.monotonic()
        run_dir = None
        with self.logged(name), Heartbeat(self.say, name, plan.seconds), Watchdog(limit) as dog:
            try:
                run_dir = RunDir.create(config, logdir)
                with stop_on_signals():
                    rc = run_local(config, run_dir.path)
            except KeyboardInterrupt:
                if not dog.fired:
                    raise
                rc = 130
        seconds = time.monotonic() - start
        if rc == 130 and not dog.fired:
            raise KeyboardInterrupt  # the user's Ctrl-C or a SIGTERM: the bench stops
        if rc not in (0, 130):
            raise RuntimeError(f"run {name} ended with exit code {rc}; see {self.rel(self.logs / (name + '.log'))}")
        if run_dir is None or not run_dir.checkpoint.is_file():
            raise RuntimeError(f"run {name} was stopped after {fmt_s(seconds)} before it wrote a checkpoint")
        state = load_torch_file(run_dir.checkpoint)
        frames, updates = int(state["counters"]["frames"]), int(state["updates"])
        snapshot = None
        if kind != "finetune":
            snapshots = run_dir.snapshot_files()
            if snapshots:
                snapshot = snapshots[-1]
            else:  # cut short before its last frame: its final checkpoint is the snapshot
                snapshot = save_snapshot(run_dir.snapshot(frames), state["agent"], config, frames, updates)
        cut = dog.fired
        if not cut:  # a run cut short says nothing reliable about the update's cost
            self.costs.observe(kind, seconds, plan)
        self.say(f"{self.stage}: {name}: {'cut short by the watchdog at' if cut else 'done,'} {frames:,} frames, "
                 f"{updates:,} updates in {fmt_s(seconds)} (load average {os.getloadavg()[0]:.1f})")
        return {"name": name, "run_dir": self.rel(run_dir.path), "frames": frames, "planned_frames": plan.frames,
                "load_1m": os.getloadavg()[0],
                "warm_frames": plan.warm * ar, "updates": updates, "seconds": seconds,
                "planned_seconds": plan.seconds, "cut_short": cut, "snapshot": self.rel(snapshot),
                "log": self.rel(self.logs / f"{name}.log")}

    # ------------------------------------------------------------------ stages

    def run_stage(self, stage: str, index: int) -> None:
        """Runs `stage` into its section of the results (filled in place, so that what a failing
        stage measured before it failed is kept), judges its target whatever happened, saves."""
        remaining = [s for s in self.stages if STAGES.index(s) >= STAGES.index(stage)]
        allot = self.budget.allot(stage, remaining)
        self.stage = f"stage {index}/{len(self.stages)} {stage}"
        self.stage_start = time.monotonic()
        self.say(f"{self.stage}: {TITLES[stage]} (allotted {fmt_s(allot)})")
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


def finetune_plan(b: Bench, seconds: float, overrides: Sequence[str]) -> RunPlan:
    """A fine-tuning run that fits `seconds` with its evaluations: at frame 0 and every quarter
    of the run (10 episodes) when it can afford them, else fewer episodes at the start and the end."""
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


def stage_finetune(b: Bench, allot: float, section: dict[str, Any]) -> None:
    from choreo.launch.commands import report

    if b.walker_snapshot is None or not b.walker_snapshot.is_file():
        raise StageSkipped("needs the walker snapshot of stage 1 (resampling), which did not come")
    minutes = b.budget.seconds / 60
    tasks = ["walker_stand"] + (["walker_walk"] if minutes >= WALK_MINUTES else [])
    runs_n = len(tasks) * len(FINETUNE_SEEDS) * 2
    snapshot = f"snapshot={b.walker_snapshot.resolve()}"
    plan = finetune_plan(b, allot / runs_n, ["mode=finetune", "env.task=walker_stand", snapshot])
    parent = b.runs / "finetune"
    section["scale"] = {"tasks": tasks, "seeds": list(FINETUNE_SEEDS), "frames": plan.frames,
                        "warm_frames": plan.warm * plan.action_repeat, "eval_every": plan.eval_every,
                        "eval_episodes": plan.eval_episodes, "snapshot": b.rel(b.walker_snapshot),
                        "paper": "2M pretraining frames; 100k fine-tuning frames, 10 evaluation episodes, 10 seeds"}
    if minutes < WALK_MINUTES:
        section["notes"] = [f"walker_walk is left out below {WALK_MINUTES:.0f} budget minutes"]
    runs = section["runs"] = []
    for task in tasks:
        for seed in FINETUNE_SEEDS:  # seed by seed, both modes: a budget cut short leaves pairs
            for mode in ("finetune", "scratch"):
                start = ["from_scratch=true"] if mode == "scratch" else [snapshot]
                overrides = ["mode=finetune", f"env.task={task}", f"seed={seed}", *start]
                run = b.train(f"{task}-{mode}-seed{seed}", "finetune", overrides, plan, STEP_S["walker"], logdir=parent)
                run.update(task=task, seed=seed, mode=mode, curve=read_eval_curve(b.out / run["run_dir"]))
                run["final_return"] = run["curve"][-1][1] if run["curve"] else None
                runs.append(run)
                b.save()
    # `choreo report` over the runs' eval.jsonl: its tables and plot, and its numbers for the verdict.
    buffer = io.StringIO()
    rc = report.run([str(parent)], plot_path=str(b.out / "finetune" / "report.png"),
                    markdown_path=str(b.out / "finetune" / "report.md"), out=buffer, err=buffer)
    section["report"] = {"text": buffer.getvalue(), "rc": rc, "markdown": "finetune/report.md",
                         "plot": "finetune/report.png"}
    files, _ = report.find_eval_files([parent])
    summary = report.summarise(report.collect_runs(files), reps=1000, seed=SEED)
    section["summary"] = {}
    for t in summary.tasks:
        section["summary"].setdefault(t.task, {})[t.mode] = {
            "mean": t.final_return[0], "se": t.final_return[1], "n": t.n,
            "normalised": t.normalised[0] if t.normalised else None,
            "final_frames": sorted({r.final_frame for r in t.runs})}
    for modes in section["summary"].values():
        if "finetune" in modes and "scratch" in modes:
            f, s = modes["finetune"], modes["scratch"]
            modes["difference"] = f["mean"] - s["mean"]
            modes["difference_se"] = math.sqrt(f["se"] ** 2 + s["se"] ** 2)


def read_eval_curve(run_dir: Path) -> list[list[float]]:
    """[[frame, mean return], ...] of a run's eval.jsonl."""
    from choreo.launch.runtime.rundir import RunDir

    records = sorted(RunDir(run_dir).read_evals(), key=lambda r: r.frame)
    return [[r.frame, r.mean_return] for r in records]


def judge_finetune(section: dict[str, Any], task: str = "walker_stand") -> dict[str, Any]:
    modes = section.get("summary", {}).get(task, {})
    diff, se = modes.get("difference"), modes.get("difference_se")
    met = None if diff is None else bool(diff > 2 * se) if se else bool(diff > 0)
    return {"text": f"on {task}, the final return fine-tuned from the snapshot above the one from scratch by more "
                    f"than two standard errors of the difference (sqrt(se_f^2 + se_s^2), over seeds)",
            "measured": diff, "two_se": None if se is None else 2 * se, "met": met}


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
    p.add_argument("--snapshot", default=None, metavar="FILE",
                   help="a walker_stand snapshot from states (small size) for the diversity and finetune stages, "
                        "in place of the one the resampling stage writes")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in their order (default all: {','.join(STAGES)})")
    args = p.parse_args(rest)
    if not args.budget_minutes > 0:
        p.error("--budget-minutes must be positive")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        p.error(f"--stages: unknown {', '.join(unknown) or 'none given'}; choose from {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    if args.snapshot and not Path(args.snapshot).is_file():
        p.error(f"--snapshot {args.snapshot}: no such file")
    os.environ.setdefault("MUJOCO_GL", "egl")
    out = Path(args.out or f"runs/bench-learning-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} is not empty; the bench writes into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if as_json else sys.stdout
    budget = Budget(args.budget_minutes * 60.0, {s: FRACTIONS[s] for s in stages})
    bench = Bench(out, budget, stream, stages, threads=max(args.threads, 0))
    if args.snapshot:
        bench.walker_snapshot = Path(args.snapshot).resolve()
    bench.results = new_results(args.budget_minutes, stages, " ".join(["choreo bench learning", *rest]),
                                bench.threads)
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


def new_results(minutes: float, stages: Sequence[str], command: str, threads: int) -> dict[str, Any]:
    import torch

    from choreo.launch.runtime.config import load_config

    learner = load_config([PRESET], WALKER).learner

    return {"format": "choreo-bench-learning", "version": 1, "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": PRESET, "seed": SEED,
            "finetune_seeds": list(FINETUNE_SEEDS), "execution": "local",
            "machine": {"cpus": os.cpu_count(), "learner_threads": threads, "learner_device": learner.device,
                        "gpu": bool(torch.cuda.is_available()), "load_1m_at_start": os.getloadavg()[0]},
            "budget": {"minutes": minutes, "seconds": minutes * 60.0, "fractions": {s: FRACTIONS[s] for s in stages},
                       "stages": {}},
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


def plot_finetune(section: dict[str, Any], out: Path) -> str | None:
    runs = [r for r in section.get("runs", []) if r.get("curve")]
    if not runs:
        return None
    tasks = sorted({r["task"] for r in runs})
    fig, axes = _figure(6 * len(tasks), 4, len(tasks))
    for ax, task in zip(axes, tasks):
        for mode, colour in (("finetune", "C0"), ("scratch", "C3")):
            members = [r for r in runs if r["task"] == task and r["mode"] == mode]
            if not members:
                continue
            for r in members:
                curve = np.array(r["curve"], dtype=float)
                ax.plot(curve[:, 0], curve[:, 1], color=colour, alpha=0.3, linewidth=0.8)
            frames = sorted({f for r in members for f, _ in r["curve"]})
            stats = [[v for r in members for f2, v in r["curve"] if f2 == f] for f in frames]
            mean = np.array([np.mean(s) for s in stats])
            se = np.array([np.std(s, ddof=1) / math.sqrt(len(s)) if len(s) > 1 else 0.0 for s in stats])
            ax.plot(frames, mean, color=colour, marker="o", label=f"{mode} (mean of {len(members)} seeds)")
            ax.fill_between(frames, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("fine-tuning frames")
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, out, "finetune.png")


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
        "finetune": f"a longer pretraining and fine-tuning: 100k pretraining frames ({_hours(small)} here) and the "
                    f"protocol's 100k fine-tuning frames per run ({_hours(9600 * ft)} per run, x6 runs)",
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
        rows.append([stage, f"{budget.get('fractions', {}).get(stage, 0):.0%}", fmt_s(spent.get("allotted_s")),
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
        lines += [f"Stage time: {fmt_s(section.get('seconds'))} of {fmt_s(section.get('allotted_s'))} allotted.", ""]
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
            parts = []
            for task, modes in section["summary"].items():
                f, s = modes.get("finetune"), modes.get("scratch")
                if f and s:
                    parts.append(f"{task}: {f['mean']:.1f} ± {f['se']:.1f} vs {s['mean']:.1f} ± {s['se']:.1f} "
                                 f"scratch")
            return "; ".join(parts) or "-"
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


def _report_finetune(section: dict[str, Any], out: Path, lines: list[str]) -> None:
    scale = section.get("scale", {})
    lines += [f"Fine-tuning (`choreo finetune`) of the walker snapshot (`{scale.get('snapshot')}`) against the same "
              f"protocol from random weights (`--from-scratch`), on {', '.join(scale.get('tasks', []))}, seeds "
              f"{', '.join(map(str, scale.get('seeds', [])))}: {_num(scale.get('frames'))} frames per run "
              f"({_num(scale.get('warm_frames'))} before the first update), an evaluation of "
              f"{scale.get('eval_episodes')} episodes at frame 0 and every {_num(scale.get('eval_every'))} frames. "
              f"The paper's protocol: {scale.get('paper')}. Final return: each seed's last evaluation, mean ± "
              f"standard error over seeds, as `choreo report` computes it.", ""]
    runs = section.get("runs", [])
    if runs:
        lines += _table(["task", "mode", "seed", "frames", "updates", "time", "final return", "run"],
                        [[r.get("task"), r.get("mode"), str(r.get("seed")), _num(r.get("frames")),
                          _num(r.get("updates")),
                          fmt_s(r.get("seconds")) + (f" ({_cut(r)})" if r.get("cut_short") else ""),
                          _num(r.get("final_return"), 1), f"`{r.get('run_dir')}`"] for r in runs])
    rows = []
    for task, modes in section.get("summary", {}).items():
        f, s = modes.get("finetune"), modes.get("scratch")
        rows.append([task, f"{f['mean']:.1f} ± {f['se']:.1f} ({f['n']})" if f else "-",
                     f"{s['mean']:.1f} ± {s['se']:.1f} ({s['n']})" if s else "-",
                     _num(modes.get("difference"), 1), _num(modes.get("difference_se"), 1)])
    if rows:
        lines += _table(["task", "fine-tuned (seeds)", "from scratch (seeds)", "difference", "s.e. of the difference"],
                        rows)
    _plot(plot_finetune, section, out, lines, "fine-tuning curves")
    rep = section.get("report")
    if rep:
        lines += [f"`choreo report` on the runs' eval.jsonl: [{rep.get('markdown')}]({rep.get('markdown')}), "
                  f"[{rep.get('plot')}]({rep.get('plot')}).", ""]
        if rep.get("text"):
            lines += ["```", rep["text"].rstrip(), "```", ""]


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
