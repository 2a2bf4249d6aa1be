"""`choreo bench pretrain`: end-to-end speed of a whole pretraining on an embedded Ray.

Runs `choreo pretrain` (launch.runtime.distributed.drive: environment workers, replay shards and the
learner as Ray actors on a loopback Ray) with the given presets (default tiny: tiny networks,
walker from states, 2 workers, 1 shard) and overrides, in a temporary run directory that is
deleted afterwards (kept under --logdir when given). Measured from the driver's first loop turn
(Ray's start-up and the construction of the actors are not timed) to its last one:
  - frames/s and updates/s, end to end;
  - learner data wait: of the time the learner spent inside its training calls, the share it
    waited for batches the limiter had already granted (learner_wait_s / learner_train_s; it
    should stay under 5%: the prefetch thread should have the next batch ready);
  - the rate limiter's waits: insert (workers held back because the learner was behind; seconds
    summed over workers, share of workers x wall time) and sample (the learner not granted a
    batch because the workers were behind; seconds, share of wall time);
  - the replay ratio trained on (sampled steps of the batches the learner trained on, per step
    inserted after the warm-up) against its target (0 = limiter off).
With --repeats N the whole run is repeated (Ray restarted each time) and the best and median
frames/s and updates/s are shown beside each run's row; on a shared machine the best is the one
least disturbed by other processes. --seconds S stops a run after S measured seconds (like Ctrl-C:
the driver writes its final checkpoint), for paper sizes where a run to --frames takes hours.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_PRESETS = ["tiny"]
DEFAULT_FRAMES = 20_000
PROG = "choreo bench pretrain"


class _Clock:
    """on_tick hook: times the loop from its first turn and stops the run after `seconds`."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.first: tuple[float, int, int] | None = None  # time, frames, updates at the first turn
        self.last: tuple[float, int, int] | None = None
        self.stopped = False
        self.waits: list[tuple[float, float, float]] = []  # time, learner wait and train seconds per turn

    def __call__(self, driver: Any) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, driver.frames, driver.updates)
        self.last = (now, driver.frames, driver.updates)
        self.waits.append((now, driver.learner_wait_seconds, driver.learner_train_seconds))
        if self.seconds is not None and now - self.first[0] >= self.seconds and not self.stopped:
            self.stopped = True
            raise KeyboardInterrupt  # the driver ends as on Ctrl-C: final checkpoint, exit 130

    def elapsed(self) -> float:
        return self.last[0] - self.first[0] if self.first and self.last else 0.0

    def late_wait_share(self, wait: float, train: float) -> float:
        """The learner's data wait share over the second half of the measured time (the first
        batches, while the shards fill their first windows, are not in it)."""
        if not self.waits:
            return 0.0
        middle = self.first[0] + self.elapsed() / 2
        _, wait0, train0 = next(w for w in self.waits if w[0] >= middle)
        return (wait - wait0) / (train - train0) if train > train0 else 0.0


def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{name} takes {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", default=None, metavar="NAME",
                   help="preset from configs/{algo,suite,size}/ (repeatable; default: tiny). "
                        "Paper sizes: --preset paper")
    p.add_argument("--frames", type=_positive(int, "--frames"), default=DEFAULT_FRAMES,
                   help=f"environment frames of each run (learner.total_frames; default {DEFAULT_FRAMES:,})")
    p.add_argument("--seconds", type=_positive(float, "--seconds"), default=None,
                   help="stop each run after this many measured seconds (default: run to --frames)")
    p.add_argument("--repeats", type=_positive(int, "--repeats"), default=1,
                   help="whole runs; best and median are reported (default 1)")
    p.add_argument("--logdir", default=None, help="keep the run directories here (default: a temporary one, deleted)")
    p.add_argument("--learners", type=_positive(int, "--learners"), default=1,
                   help="also run with this many learner ranks (learner.num_learners) and compare with one")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_actors=4")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """The options and the resolved config (ConfigError for a bad preset or key=value)."""
    from choreo.launch.runtime.config import load_config

    args = _parser().parse_args(argv)
    args.preset = args.preset or list(DEFAULT_PRESETS)
    config = load_config(args.preset, [*args.overrides, f"learner.total_frames={args.frames}"])
    return args, config


def drive_in_new_run(config: Any, logdir: str | None, on_tick: Any, prefix: str,
                     as_json: bool = False) -> tuple[Any, Path]:
    """A pretraining on an embedded Ray in a new run directory under `logdir`, or under a temporary
    directory (named with `prefix`) that is deleted afterwards. Returns the driver and the run dir.
    as_json: the run's own lines go to stderr, so that stdout holds only the JSON figures."""
    from choreo.launch.runtime.distributed import drive
    from choreo.launch.runtime.rundir import RunDir

    os.environ.setdefault("MUJOCO_GL", "egl")
    root = Path(logdir) if logdir else Path(tempfile.mkdtemp(prefix=prefix))
    if logdir:
        config = dataclasses.replace(config, logdir=str(logdir))
    run_dir = RunDir.create(config, root).path
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            return drive(config, run_dir, on_tick=on_tick), run_dir
    finally:
        if not logdir:
            shutil.rmtree(root, ignore_errors=True)


def run_once(config: Any, logdir: str | None, seconds: float | None = None, as_json: bool = False) -> dict[str, Any]:
    """One pretraining; its figures (see the module docstring)."""
    clock = _Clock(seconds)
    driver, run_dir = drive_in_new_run(config, logdir, clock, "choreo-bench-pretrain-", as_json)
    if driver.exit_code not in (0, 130) or (driver.exit_code == 130 and not clock.stopped):
        raise SystemExit(f"{PROG}: the run failed (exit code {driver.exit_code})")
    s = driver.summary()
    wall = clock.elapsed()
    frames = clock.last[1] - clock.first[1] if clock.first else 0
    updates = clock.last[2] - clock.first[2] if clock.first else 0
    wait, train = s["learner_wait_s"], s["learner_train_s"]
    workers = config.num_actors
    return {"frames": s["frames"], "updates": s["updates"], "seconds": wall,
            "stopped_at_time_limit": clock.stopped,
            "frames_per_s": frames / wall if wall > 0 else 0.0, "updates_per_s": updates / wall if wall > 0 else 0.0,
            "learner_wait_s": wait, "learner_train_s": train,
            "learner_wait_share": wait / train if train > 0 else 0.0,
            "learner_wait_share_second_half": clock.late_wait_share(wait, train),
            "insert_wait_s": s["insert_wait_s"],
            "insert_wait_share": s["insert_wait_s"] / (workers * wall) if wall > 0 else 0.0,
            "sample_wait_s": s["sample_wait_s"], "sample_wait_share": s["sample_wait_s"] / wall if wall > 0 else 0.0,
            "ratio": s["ratio"], "target_ratio": s["target_ratio"],
            "restarts": s["runner_restarts"] + s["shard_restarts"] + s["learner_restarts"],
            "run_dir": str(run_dir) if logdir else None}


def compare_learners(args: argparse.Namespace, config: Any, as_json: bool) -> int:
    """The same pretraining with one learner and with `args.learners` ranks (best of --repeats each):
    frames/s, updates/s and sequences trained per second (updates x ranks' batches)."""
    from choreo.launch.runtime.config import group_batch_size

    figures = {}
    for world in (1, args.learners):
        cfg = dataclasses.replace(config, learner=dataclasses.replace(config.learner, num_learners=world))
        runs = [run_once(cfg, args.logdir, args.seconds, as_json) for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["frames_per_s"])
        best["sequences_per_s"] = best["updates_per_s"] * group_batch_size(cfg)
        figures[world] = best
        if not as_json:
            print(f"\n{world} learner rank(s), best of {args.repeats}: {_row(best)}, "
                  f"{best['sequences_per_s']:,.1f} sequences/s trained", flush=True)
    one, many = figures[1], figures[args.learners]
    if as_json:
        print(json.dumps({"presets": args.preset, "overrides": args.overrides, "learners": args.learners,
                          "runs": {str(k): v for k, v in figures.items()}}, indent=2))
        return 0
    print(f"\n{_describe(config, args.preset)}; scaling {config.learner.scaling}")
    for key, unit in (("frames_per_s", "frames/s"), ("updates_per_s", "updates/s"), ("sequences_per_s", "sequences/s")):
        ratio = many[key] / one[key] if one[key] else float("nan")
        print(f"  {unit:<12} 1 rank {one[key]:>10,.2f}   {args.learners} ranks {many[key]:>10,.2f}   x{ratio:.2f}")
    return 0


def _describe(config: Any, presets: list[str]) -> str:
    a = config.agent.world_model
    return (f"{config.env.task} from {config.env.obs}, presets {'+'.join(presets)} (size {config.size}: "
            f"deter {a.deter}, mlp {a.mlp_units}), {config.num_actors} workers x {config.envs_per_actor} envs, "
            f"{config.num_shards} shard(s), batch {config.replay.batch_size}x{config.replay.batch_length}, "
            f"samples_per_insert {config.replay.samples_per_insert:g}, learner.device={config.learner.device}")


def _row(r: dict[str, Any]) -> str:
    limit = " (time limit)" if r["stopped_at_time_limit"] else ""
    return (f"{r['frames']:,} frames, {r['updates']:,} updates in {r['seconds']:.1f} s{limit}: "
            f"{r['frames_per_s']:,.1f} frames/s, {r['updates_per_s']:.2f} updates/s")


def run(rest: list[str], as_json: bool = False) -> int:
    args, config = parse(rest)
    as_json = as_json or args.json
    if args.learners > 1:
        return compare_learners(args, config, as_json)
    if not as_json:
        print(_describe(config, args.preset), flush=True)
    results = []
    for k in range(args.repeats):
        r = run_once(config, args.logdir, args.seconds, as_json)
        results.append(r)
        if not as_json:
            print(f"\nrun {k + 1}/{args.repeats}: {_row(r)}", flush=True)
    fps = [r["frames_per_s"] for r in results]
    ups = [r["updates_per_s"] for r in results]
    best = max(results, key=lambda r: r["frames_per_s"])
    figures = {"best_frames_per_s": max(fps), "median_frames_per_s": statistics.median(fps),
               "best_updates_per_s": max(ups), "median_updates_per_s": statistics.median(ups)}
    if as_json:
        print(json.dumps({"presets": args.preset, "overrides": args.overrides, "num_actors": config.num_actors,
                          "num_shards": config.num_shards, "target_frames": args.frames, **figures,
                          "runs": results}, indent=2))
        return 0
    print(f"\n{_describe(config, args.preset)}")
    print(f"measured from the driver's first loop turn; best (median) of {args.repeats} run(s); "
          f"other figures from the best run")
    print(f"  throughput        {figures['best_frames_per_s']:>10,.1f} frames/s  "
          f"({figures['median_frames_per_s']:,.1f})"
          f"   {figures['best_updates_per_s']:>8.2f} updates/s  ({figures['median_updates_per_s']:.2f})")
    share = best["learner_wait_share"]
    print(f"  learner data wait {best['learner_wait_s']:>10.2f} s of {best['learner_train_s']:.1f} s in training "
          f"calls = {100 * share:.1f}%; second half of the run {100 * best['learner_wait_share_second_half']:.1f}%"
          f"  (target < 5%{'' if share < 0.05 else ': MISSED'})")
    print(f"  limiter: insert   {best['insert_wait_s']:>10.2f} s summed over {config.num_actors} workers "
          f"= {100 * best['insert_wait_share']:.1f}% of their time (workers held back: learner behind)")
    print(f"  limiter: sample   {best['sample_wait_s']:>10.2f} s = {100 * best['sample_wait_share']:.1f}% of wall time "
          f"(learner held back: workers behind)")
    target = best["target_ratio"]
    print(f"  trained/inserted  {best['ratio']:>10.2f}  (target "
          + (f"{target:g}, {100 * (best['ratio'] / target - 1):+.1f}%)" if target else "0: limiter off)"))
    if best["restarts"]:
        print(f"  note: {best['restarts']} restarts during the run")
    return 0
