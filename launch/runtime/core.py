"""The run core: what every loop decides, without Ray.

A loop (`launch/runtime/local.py` in one process, `launch/runtime/distributed.py` on Ray) moves data and calls
roles; the core decides and counts:
- the counters: frames collected, updates trained, the weight version the workers act with;
- the rate limiter's accounting: a worker's call reserves its steps before it is dispatched
  (`may_collect`) and counts them when it returns (`collected`); batches are granted to the
  learner (`grant`) and counted as sampled only when it reports them trained (`trained`), so the
  ratio is what was trained on, whatever an update costs;
- when evaluations are due (`eval.every_frames`, the first at frame 0, the last once the run has
  its frames) and where their results go (TensorBoard and `eval.jsonl`);
- the checkpoint cadence, the metric names written to TensorBoard (with the run's config as text
  and its hyperparameters in the HParams view), the progress line and the exit messages.

TensorBoard's groups, one name per series: the agent's (`world_model/`, `explore/` with the LBS
predictor, `codebook/`, `skill_ac/`, `meta/`, DADS's `dynamics/`, `dads/`, `sac/`, `time/`) and the
runtime's (`actors/`, `replay/`, `learner/`, `throughput/`, `episode/`, `eval/`); durations are in
seconds, named `*_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from choreo.launch.runtime.build import make_limiter
from choreo.launch.runtime.config import Config, group_batch_size, to_yaml
from choreo.launch.runtime.monitor import HParam, Monitor, Pace, loss_note
from choreo.launch.runtime.plan import resolve_plan
from choreo.launch.runtime.rundir import EvalRecord, RunDir
from choreo.vocabulary import WriteFailed

MAX_OUTSTANDING_BATCHES = 4
"""Batches granted to the learner and not yet trained on: enough for its prefetch queue to stay
full, few enough that the workers are held back as soon as the learner falls behind."""


HPARAM_METRICS = ("eval/return", "world_model/loss", "dynamics/loss", "actors/frames", "learner/updates")
"""The scalars TensorBoard's HParams view shows beside each run's hyperparameters (their latest
values): the last evaluation's mean return, the world model's loss (DADS: the skill dynamics'), the
frames collected and the updates trained."""

_HPARAMS: tuple[tuple[str, type, Callable[[Config], HParam | None]], ...] = (
    ("algo", str, lambda c: c.algo),
    ("suite", str, lambda c: c.suite),
    ("size", str, lambda c: c.size),
    ("mode", str, lambda c: resolve_plan(c).label),
    ("task", str, lambda c: c.env.task),
    ("obs", str, lambda c: c.env.obs),
    ("seed", int, lambda c: c.seed),
    ("snapshot", str, lambda c: c.snapshot or None),
    ("dataset", str, lambda c: c.dataset.dir or None),
    ("total_frames", int, lambda c: c.learner.total_frames if resolve_plan(c).unit == "frames" else None),
    ("total_updates", int, lambda c: c.learner.total_updates if resolve_plan(c).unit == "updates" else None),
    ("action_repeat", int, lambda c: c.env.action_repeat),
    ("num_actors", int, lambda c: c.num_actors if resolve_plan(c).workers else None),
    ("envs_per_actor", int, lambda c: c.envs_per_actor if resolve_plan(c).workers else None),
    ("num_learners", int, lambda c: c.learner.num_learners),
    ("batch_size", int, lambda c: c.replay.batch_size),
    ("batch_length", int, lambda c: c.replay.batch_length),
    ("replay_ratio", float, lambda c: c.replay.samples_per_insert),
    ("wm_lr", float, lambda c: c.agent.world_model.lr if c.algo == "choreographer" else None),
    ("actor_lr", float, lambda c: c.agent.actor_critic.actor_lr if c.algo == "choreographer" else None),
    ("critic_lr", float, lambda c: c.agent.actor_critic.critic_lr if c.algo == "choreographer" else None),
    ("skill_lr", float, lambda c: c.agent.choreographer.skill_lr if c.algo == "choreographer" else None),
    ("num_codes", int, lambda c: c.agent.choreographer.num_codes if c.algo == "choreographer" else None),
    ("code_dim", int, lambda c: c.agent.choreographer.code_dim if c.algo == "choreographer" else None),
    ("horizon", int, lambda c: c.agent.actor_critic.horizon if c.algo == "choreographer" else None),
    ("freeze_skills", bool, lambda c: c.agent.finetune.freeze_skills if resolve_plan(c).phase == "finetune" else None),
    ("skill_dim", int, lambda c: c.agent.dads.skill_dim if c.algo == "dads" else None),
    ("skill_type", str, lambda c: c.agent.dads.skill_type if c.algo == "dads" else None),
    ("dynamics_lr", float, lambda c: c.agent.dads.dynamics_lr if c.algo == "dads" else None),
    ("sac_lr", float, lambda c: c.agent.dads.lr if c.algo == "dads" else None),
)
"""The hyperparameters of the HParams view: (name, type, value of a config, None where it does not
apply). The same names for every run: TensorBoard takes the columns from one run's list."""

HPARAM_COLUMNS: dict[str, type] = {name: kind for name, kind, _ in _HPARAMS}


def hparams(config: Config) -> dict[str, HParam | None]:
    """The run's main hyperparameters for TensorBoard's HParams view (None: does not apply to it)."""
    return {name: value(config) for name, _, value in _HPARAMS}


class RunStopped(RuntimeError):
    """A fault the run cannot recover from; the message says which and why."""


class RunCore:
    """Counters, limiter accounting, checkpoint cadence, metrics and exit messages of one run.

    counters: what the last checkpoint saved (`{"frames", "limiter"}`), or None for a new run.
    updates: the learner's update count (its weight version) when the loop starts.
    local: the run is the single-process loop (`--local`), which the resume command repeats.
    """

    def __init__(self, config: Config, run_dir: Path, num_workers: int, action_repeat: int,
                 counters: Mapping[str, Any] | None, updates: int, local: bool,
                 monitor: Monitor | None = None, clock: Callable[[], float] = time.monotonic,
                 dataset_steps: int = 0) -> None:
        """dataset_steps: the steps of the offline dataset loaded into replay for a new run (a
        resumed one reads them from its counters)."""
        self.config, self.run_dir, self.clock = config, Path(run_dir), clock
        rc = config.replay
        counters = dict(counters or {})
        self.plan = plan = resolve_plan(config)
        self.dataset_steps = int(counters.get("dataset_steps", dataset_steps))
        self.limiter = make_limiter(config, self.dataset_steps)
        if "limiter" in counters:
            self.limiter.load_state_dict(counters["limiter"])
        elif self.dataset_steps:
            self.limiter.on_insert(self.dataset_steps)  # the warm-up, not counted in the ratio
        self.frames = int(counters.get("frames", 0))
        self.updates = int(updates)
        self.action_repeat = action_repeat
        self.batch_steps = group_batch_size(config) * rc.batch_length  # every learner rank's batch counts
        self.outstanding = 0  # batches granted to the learner and not trained on
        self.metrics: dict[str, float] = {}  # the learner's latest
        self.stopping: str | None = None  # why the run stops, once a stop was asked for
        # how the user continues this run once it stopped: the command of its mode, with --resume
        self.resume_command = f"choreo {plan.mode}{' --local' if local else ''} --resume {self.run_dir}"
        self.monitor = monitor or Monitor(self.run_dir, plan.total, unit=plan.unit, clock=clock)
        self.monitor.start_rates(self.frames, self.updates)  # a resumed run's rates count from where it was
        frames_per_update = (self.batch_steps / rc.samples_per_insert * action_repeat
                             if rc.samples_per_insert else 0.0)
        if plan.workers:
            self.pace = Pace(plan.total, frames_per_update, num_workers, clock=clock)
        else:  # the pace of updates alone
            self.pace = Pace(plan.total, 0.0, 1, clock=clock)
        self.last_checkpoint = clock()
        # progress (frames, or updates) at the last checkpoint written: the one a resume starts from
        self.checkpoint_at: int | None = self.log_step if counters else None
        self.next_eval = int(counters.get("next_eval", 0))  # the frame the next evaluation is due at
        self.evaluating = False
        self._eval_at = 0  # the frame (offline only: update) of the evaluation running
        self.last_eval: tuple[int, float] | None = None  # (frame, mean return) of the latest evaluation
        self._insert_held_since: dict[int, float] = {}
        self._sample_held_since: float | None = None
        self._lags: list[float] = []
        self._describe()

    def _describe(self) -> None:
        """The run's resolved config (text) and its row of the HParams view, written as it starts
        (and again when it resumes), with the counters it has: a run that crashes still shows."""
        self.monitor.text("config", f"```yaml\n{to_yaml(self.config)}```", self.log_step)
        self.monitor.hparams(hparams(self.config), HPARAM_COLUMNS, HPARAM_METRICS)
        self.monitor.scalars(self.counter_scalars(), self.log_step)

    @property
    def log_step(self) -> int:
        """TensorBoard's x axis and the progress count, in the plan's unit: frames, or updates in a
        run without environment workers."""
        return self.updates if self.plan.unit == "updates" else self.frames

    @property
    def version(self) -> int:
        """The weight version the learner publishes: its update count."""
        return self.updates

    # ------------------------------------------------------------------ workers

    def may_collect(self, worker: int, steps: int) -> bool:
        """Whether worker `worker` may collect `steps` agent steps now; if so they are reserved
        until `collected` (or `collect_lost`). A refusal starts (or continues) its wait."""
        now = self.clock()
        if self.stopping or self.done or (self.plan.unit == "frames" and self._eval_behind()) \
                or not self.limiter.reserve_insert(steps):
            self._insert_held_since.setdefault(worker, now)
            return False
        since = self._insert_held_since.pop(worker, None)
        if since is not None:
            self.limiter.record_wait("insert", now - since)
        return True

    def collected(self, steps: int, version: int) -> None:
        """A worker's call came back with `steps` agent steps, acted with weights `version`."""
        self.limiter.complete_insert(steps)
        self.frames += steps * self.action_repeat
        if version >= 0:
            self._lags.append(self.version - version)

    def collect_lost(self, steps: int) -> None:
        """A reserved call will not come back (its worker broke for good)."""
        self.limiter.complete_insert(steps, inserted=False)

    # ------------------------------------------------------------------ learner

    def grant(self) -> int:
        """Batches the learner may draw now (reserved until `trained`): as many as the limiter
        allows, up to MAX_OUTSTANDING_BATCHES not yet trained on. While the learner has nothing to
        train on because of the limiter, its wait is counted."""
        if self.stopping or (self.plan.unit == "updates" and self._eval_behind()):
            return 0
        n = 0
        most = MAX_OUTSTANDING_BATCHES
        if self.plan.unit == "updates":  # no more batches than the updates left
            most = min(most, self.plan.total - self.updates)
        while self.outstanding + n < most and self.limiter.reserve_sample(self.batch_steps):
            n += 1
        self.outstanding += n
        now = self.clock()
        if n and self._sample_held_since is not None:
            self.limiter.record_wait("sample", now - self._sample_held_since)
            self._sample_held_since = None
        elif not n and self.outstanding == 0 and self._sample_held_since is None:
            self._sample_held_since = now
        return n

    def trained(self, batches: int, updates: int, metrics: Mapping[str, float] | None = None) -> None:
        """The learner trained on `batches` granted batches and now stands at `updates` updates."""
        batches = min(batches, self.outstanding)
        self.outstanding -= batches
        self.limiter.complete_sample(batches * self.batch_steps)
        self.updates = updates
        if metrics:
            self.metrics = dict(metrics)
            self.monitor.scalars(self.metrics, self.log_step)

    def release(self, batches: int) -> None:
        """Gives back `batches` granted batches that will not be trained on (the replay held no
        full window yet, or the learner holding them died)."""
        batches = min(batches, self.outstanding)
        self.outstanding -= batches
        self.limiter.complete_sample(batches * self.batch_steps, trained=False)

    def learner_replaced(self, updates: int) -> None:
        """A dead learner was replaced from the last checkpoint, at `updates` updates: the batches
        it held died with it, and the samples of the updates it made since the checkpoint are
        uncounted (the new learner redoes them, so the workers wait for it as they should)."""
        self.release(self.outstanding)
        self.limiter.forget_samples(max(self.updates - updates, 0) * self.batch_steps)
        self.updates = updates

    # ------------------------------------------------------------------ cadence

    @property
    def done(self) -> bool:
        """The run has its frames (workers get no more calls), or a run without workers its updates."""
        return self.log_step >= self.plan.total

    @property
    def finished(self) -> bool:
        """The run has its frames and its last evaluation."""
        return self.done and not self.evaluating and not self.eval_due()

    # ------------------------------------------------------------------ evaluations

    @property
    def eval_every(self) -> int:
        return self.plan.eval_every

    def eval_due(self) -> bool:
        """An evaluation is due (at 0, then every `eval_every`) and none is running."""
        return self.eval_every > 0 and not self.evaluating and self.log_step >= self.next_eval

    def start_eval(self) -> int:
        """The loop starts the due evaluation with the current weights; returns the frame (offline
        only: the update) it is of."""
        self.evaluating = True
        self._eval_at = self.log_step
        return self.log_step

    def _eval_behind(self) -> bool:
        """An evaluation is running and the run has reached the next one's frame (offline only:
        update): the side that advances the count waits for it, so that no evaluation of the
        schedule is skipped however long one takes."""
        return self.evaluating and self.log_step >= (self._eval_at // self.eval_every + 1) * self.eval_every
    def evaluated(self, frame: int, returns: list[float], skill_counts: list[dict[str, int]] | None = None) -> None:
        """An evaluation's episode returns: to TensorBoard (`eval/*` at `frame`), one line of
        `eval.jsonl` (task, seed, frame, mean return, every return, mode; `skill_counts`, the skills
        a meta-controller chose in each episode, when given) and the terminal."""
        every = self.eval_every
        self.evaluating = False
        self.next_eval = (frame // every + 1) * every
        values = np.asarray(returns, np.float64)
        mean = float(values.mean())
        self.last_eval = (int(frame), mean)
        se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        self.monitor.scalars({"eval/return": mean, "eval/return_se": se, "eval/episodes": len(values)}, frame)
        c = self.config
        RunDir(self.run_dir).append_eval(EvalRecord.of(
            c.env.task, c.seed, self.frames if self.plan.unit == "updates" else int(frame), self.updates,
            self.plan.label, values, **({"skill_counts": skill_counts} if skill_counts else {})))
        print(f"\nevaluation at {frame:,} {self.plan.unit}: return {mean:.1f} +- {se:.1f} over {len(values)} episodes",
              flush=True)

    def eval_lost(self) -> None:
        """The evaluation in flight will not come back (it is started again when due)."""
        self.evaluating = False

    def checkpoint_due(self) -> bool:
        return self.clock() - self.last_checkpoint > 60 * self.config.learner.checkpoint_minutes

    def counters(self) -> dict[str, Any]:
        """What a checkpoint stores beside the learner's state."""
        return {"frames": self.frames, "limiter": self.limiter.state_dict(), "next_eval": self.next_eval,
                "dataset_steps": self.dataset_steps}

    def checkpointed(self) -> None:
        """The loop wrote a checkpoint with `counters()` (periodic or final)."""
        self.last_checkpoint = self.clock()
        self.checkpoint_at = self.log_step

    # ------------------------------------------------------------------ metrics

    def held_seconds(self) -> tuple[float, float]:
        """Seconds the workers (summed) and the learner were held by the limiter, ongoing waits included."""
        now, st = self.clock(), self.limiter.stats()
        workers = st["insert_wait_s"] + sum(now - t for t in self._insert_held_since.values())
        learner = st["sample_wait_s"] + (now - self._sample_held_since if self._sample_held_since is not None else 0)
        return workers, learner

    def counter_scalars(self) -> dict[str, float]:
        """Frames collected, updates trained and the weight version the workers get."""
        return {"actors/frames": self.frames, "learner/updates": self.updates, "learner/weight_version": self.version}

    def ratio_scalars(self) -> dict[str, float]:
        """The replay ratio trained on (sampled steps per inserted step after the warm-up) beside its
        target, and the limiter's counters and waits: the steps it counted on each side, and how long
        (seconds, summed over the workers) and how often each side was held back by it."""
        st = self.limiter.stats()
        return {"replay/ratio": self.limiter.ratio(), "replay/target_ratio": self.config.replay.samples_per_insert,
                "replay/inserted_steps": st["inserted"], "replay/trained_steps": st["sampled"],
                "replay/reserved_insert_steps": st["insert_reserved"],
                "replay/reserved_sample_steps": st["sample_reserved"],
                "actors/limiter_wait_s": st["insert_wait_s"], "actors/limiter_waits": st["insert_wait_count"],
                "learner/limiter_wait_s": st["sample_wait_s"], "learner/limiter_waits": st["sample_wait_count"],
                "learner/outstanding_batches": self.outstanding}

    def log(self, worker_stats: Iterable[Mapping[str, Any]] = (), shard_stats: Iterable[Mapping[str, Any] | None] = (),
            extra: Mapping[str, float] | None = None) -> None:
        """Writes the periodic scalars: workers' rates and episodes, policy lag, shards, the ratio,
        throughput. Every loop logs through here, so the names mean one thing everywhere."""
        monitor, frames = self.monitor, self.log_step
        scalars: dict[str, float] = {}
        worker_stats = list(worker_stats)
        for st in worker_stats:
            rid = st["runner_id"]
            scalars[f"actors/{rid}/steps_per_second"] = st["steps_per_second"]
            for episode_return, length in st["episodes"]:
                monitor.scalars({"episode/return": episode_return, "episode/length": length}, frames)
        if worker_stats:
            scalars["actors/steps_per_second"] = sum(st["steps_per_second"] for st in worker_stats)
        moves = np.array([d for st in worker_stats for d in st.get("xy_displacements", ())], np.float64)
        if len(moves):  # navigation tasks: how far the episodes went, and how differently (the skills' spread)
            scalars["episode/xy_distance"] = float(np.linalg.norm(moves, axis=1).mean())
            if len(moves) > 1:
                scalars["episode/xy_spread"] = float(np.sqrt(moves.var(axis=0).sum()))
        if self._lags:
            # how many updates behind the learner the weights were that acted in the calls since the last log
            scalars["actors/policy_lag"] = float(np.mean(self._lags))
            self._lags.clear()
        steps = 0
        for i, st in enumerate(shard_stats):
            if st is None:
                continue
            steps += st["steps"]
            scalars[f"replay/shard{i}/steps"] = st["steps"]
            scalars[f"replay/shard{i}/inserted_steps"] = st["steps_inserted"]
            scalars[f"replay/shard{i}/sampled_steps"] = st["steps_sampled"]
        scalars["replay/steps"] = steps
        scalars.update(self.ratio_scalars())
        scalars.update(self.counter_scalars())
        # over the last RATE_WINDOW seconds at least (launch/runtime/monitor.py), however often this is called
        scalars["throughput/frames_per_second"], scalars["throughput/updates_per_second"] = \
            monitor.rates(self.frames, self.updates)
        scalars.update(extra or {})
        monitor.scalars(scalars, frames)

    def progress(self, note: str = "", force: bool = False) -> None:
        """The progress line: frames, rates and the time left at the pace the limiter allows (during
        the warm-up: its rates since the start, and no estimate)."""
        warm = self.limiter.stats()["inserted"] >= self.limiter.min_size
        if warm:
            self.pace.update(self.log_step, self.updates, *self.held_seconds())
        note = note.strip()
        self.monitor.progress(self.log_step, self.updates,
                              [loss_note(self.metrics), note if warm else f"warm-up {note}".strip()],
                              force=force, pace=self.pace if warm else None, eta=warm)

    # ------------------------------------------------------------------ the end

    def stop(self, why: str) -> None:
        """A stop was asked for (a signal) or is forced (a fault): final, nothing is restarted after it."""
        if self.stopping is None:
            self.stopping = why

    def finish(self, outcome: str, checkpoint: Callable[[], None] | None, detail: str = "", notes: str = "") -> int:
        """Ends the run: writes the final checkpoint (unless `checkpoint` is None), prints what happened
        and how to continue, closes the monitor; returns the exit code.

        outcome: "done" (0), "interrupted" (a signal, 130), "stopped" (a fault, 1) or "nonfinite"
        (1, no checkpoint: the last one is the last good state). detail: the fault's message.
        """
        word = {"done": "done", "interrupted": "interrupted: writing a checkpoint"}.get(outcome, "stopped")
        self.progress(word, force=True)
        # the series the HParams view reads, at their final values
        self.monitor.scalars({**self.ratio_scalars(), **self.counter_scalars()}, self.log_step)
        lines = []
        if outcome in ("stopped", "nonfinite"):
            lines.append(f"the run stopped: {detail}")
        saved = None
        if checkpoint is not None:
            try:
                checkpoint()
                saved = True
            except Exception as exc:  # noqa: BLE001 - say why, and which checkpoint is still good
                lines.append(f"could not write the final checkpoint ({failure(exc)}); " + self._last_good())
                saved = False
        if outcome == "done":
            lines.append(f"finished: {self.frames:,} frames, {self.updates:,} updates; run directory {self.run_dir}"
                         + (f"; {notes}" if notes else ""))
        elif outcome == "nonfinite":
            lines.append("no checkpoint was written after the non-finite updates; " + self._last_good())
        elif saved:
            lines.append(f"checkpoint written at {self.log_step:,} {self.plan.unit}; "
                         + ("after fixing the cause " if outcome == "stopped" else "")
                         + f"continue with: {self.resume_command}")
        self.monitor.close()
        print("\n" + "\n".join(lines), flush=True)
        if outcome == "done" and saved is False:
            return 1  # finished, but its end is not on disk
        return {"done": 0, "interrupted": 130}.get(outcome, 1)

    def checkpoint_failed(self, exc: BaseException) -> None:
        """A periodic checkpoint (or the replay written before it) failed: one line says why and which
        checkpoint is still the last good one; the run goes on and tries again at the next cadence."""
        self.last_checkpoint = self.clock()
        print(f"\ncheckpoint not written: {failure(exc)}; {self._last_good()}; the run goes on", flush=True)

    def write_failed(self, message: str) -> None:
        """A file the run can do without (a snapshot) could not be written: one line, and on."""
        print(f"\n{message}; the run goes on without it", flush=True)

    def _last_good(self) -> str:
        path = RunDir(self.run_dir).checkpoint
        if self.checkpoint_at is None or not path.exists():
            return f"there is no checkpoint of this run yet ({path} was never written)"
        return (f"the last good one is {path}, at {self.checkpoint_at:,} {self.plan.unit}; "
                f"continue with: {self.resume_command}")


def failure(exc: BaseException) -> str:
    """One line for an error: a failed write's own message (naming the file and why), otherwise the
    error's type and last line. An error raised in a Ray actor is read through to its cause."""
    exc = getattr(exc, "cause", None) or exc
    text = str(exc).strip().splitlines()
    if isinstance(exc, WriteFailed):
        return text[-1]
    return type(exc).__name__ + (f": {text[-1]}" if text else "")
