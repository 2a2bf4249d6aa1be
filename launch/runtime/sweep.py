"""Many runs at once: `choreo finetune --snapshot FILE --tasks a,b --seeds 0,1,2` (the URL
benchmark is 12 tasks x 10 seeds per snapshot).

Each (task, seed) is a run of its own: its own run directory, learner, replay shards, workers and
evaluation worker, driven by the same Ray layer as a single run (`Driver`, in a `RunActor` inside
the cluster). A run reserves all of it in one Ray placement group before it starts, so runs wait in
Ray's own queue instead of starving each other, and a cluster fills with as many as fit
(`--parallel N` bounds that on the embedded Ray, whose CPUs are logical). This process only places
the runs, shows one progress view of them all, and reports those that fail while the others go on.
A signal stops every run like a single one: each writes its final checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from choreo.launch.runtime.config import Config
from choreo.launch.runtime.rundir import RunDir

VIEW_SECONDS = 2.0
"""Seconds between two updates of the progress view (30 when not on a terminal)."""


STOP_SECONDS = 180.0
"""Seconds the runs get to write their final checkpoints after a signal before this process stops Ray."""


def run_resources(config: Config, gpu: bool) -> dict[str, float]:
    """What one run reserves: a CPU per environment worker, one for the learner (and a GPU when the
    learner takes one), one for the evaluation worker, and one that the token shares of its shards
    and its driver split (whole CPUs: Ray's fixed-point sums of fractions can fall short by 1e-4)."""
    cpus = config.num_actors + 1 + (config.eval.every_frames > 0) + 1
    return {"CPU": float(cpus), **({"GPU": 1.0} if gpu else {})}


class RunActor:
    """One run's driver inside the cluster: the `Driver` of a single run, its terminal output in
    `<run_dir>/driver.log`. Threaded, so that `status` and `stop` answer while `run` runs."""

    def __init__(self, config: Config, run_dir: str) -> None:
        self.config, self.run_dir = config, Path(run_dir)
        self.driver: Any = None
        self.stopped = False
        log = open(RunDir(self.run_dir).driver_log, "a", buffering=1)  # noqa: SIM115 - the actor's lifetime
        sys.stdout = sys.stderr = log

    def run(self) -> int:
        import ray

        from choreo.launch.runtime.distributed import Driver

        self.driver = Driver(ray, self.config, self.run_dir, resume=False)
        if self.stopped:
            self.driver.request_stop()
        code = self.driver.run()
        self.driver.exit_code = code
        return code

    def status(self) -> dict[str, Any]:
        d = self.driver
        if d is None:
            return {"state": "starting", "frames": 0}
        core = d.core
        return {"state": "stopping" if core.stopping else "running", "frames": core.frames,
                "updates": core.updates, "last_eval": core.last_eval}

    def stop(self) -> None:
        self.stopped = True
        if self.driver is not None:
            self.driver.request_stop()


def run_sweep(runs: list[tuple[Config, Path]], address: str | None = None, parallel: int = 1,
              stream: TextIO | None = None) -> int:
    """Runs every (config, run directory) on Ray, side by side as resources allow; returns 0 when
    all finished, 1 when any failed, 130 when a signal stopped them."""
    from choreo.launch.runtime.ray_runtime import connect_ray, shutdown_ray, start_local_ray

    stream = stream or sys.stderr
    if address:
        connect_ray(address)
    else:
        need = run_resources(runs[0][0], gpu=False)["CPU"]
        start_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(need * max(parallel, 1))))
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from choreo.launch.runtime.signals import signals_stop_the_run

    gpu_cluster = ray.cluster_resources().get("GPU", 0) > 0
    actor_cls = ray.remote(num_cpus=0.01, max_concurrency=4, max_restarts=0)(RunActor)
    state: list[dict[str, Any]] = []
    with signals_stop_the_run():
        try:
            for config, run_dir in runs:
                gpu = config.learner.device == "cuda" or (config.learner.device == "auto" and gpu_cluster)
                group = ray.util.placement_group([run_resources(config, gpu)], strategy="STRICT_PACK")
                actor = actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=0)).remote(config, str(run_dir))
                state.append({"config": config, "run_dir": run_dir, "group": group, "actor": actor,
                              "ref": actor.run.remote(), "code": None, "error": None, "status": {"state": "queued"}})
            _watch(ray, state, stream)
        except KeyboardInterrupt:
            stream.write("\nstopping every run: each writes its final checkpoint\n")
            for run in state:
                if run["code"] is None:
                    with contextlib.suppress(Exception):
                        run["actor"].stop.remote()
            _watch(ray, state, stream, stopping=True)
        finally:
            for run in state:
                with contextlib.suppress(Exception):
                    ray.util.remove_placement_group(run["group"])
            shutdown_ray()
    failed = [r for r in state if r["code"] not in (0, 130)]
    for r in failed:
        why = r["error"] or f"exit code {r['code']}"
        stream.write(f"failed: {r['run_dir']} ({why}); see {RunDir(r['run_dir']).driver_log}\n")
    if any(r["code"] == 130 for r in state):
        return 130
    return 1 if failed else 0


def _watch(ray: Any, state: list[dict[str, Any]], stream: TextIO, stopping: bool = False) -> None:
    """Until every run ended: collects exit codes (a failed run is noted, the others go on) and
    shows one line per run."""
    interactive = stream.isatty()
    every = VIEW_SECONDS if interactive else 30.0
    shown, last = 0, -math.inf
    deadline = time.monotonic() + STOP_SECONDS if stopping else math.inf
    while True:
        active = [r for r in state if r["code"] is None]
        if active and time.monotonic() > deadline:
            for r in active:
                r["code"], r["error"] = 130, f"did not stop within {STOP_SECONDS:.0f} s; its last checkpoint stands"
            active = []
        if active:
            ready, _ = ray.wait([r["ref"] for r in active], num_returns=1, timeout=1.0)
            for r in active:
                if r["ref"] in ready:
                    try:
                        r["code"] = ray.get(r["ref"])
                    except ray.exceptions.RayError as exc:
                        r["code"], r["error"] = 1, str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    r["status"]["state"] = {0: "done", 130: "stopped"}.get(r["code"], "failed")
                    ray.util.remove_placement_group(r["group"])  # its resources go to the runs still queued
        _poll_status(ray, state)
        now = time.monotonic()
        if now - last >= every or not active:
            last = now
            lines = [_line(r) for r in state]
            if interactive and shown:
                stream.write(f"\x1b[{shown}F")  # back to the first line of the previous view
            stream.write("".join(line.ljust(100)[:100] + "\n" for line in lines))
            if not interactive:
                stream.write("\n")
            stream.flush()
            shown = len(lines)
        if not active:
            return


def _poll_status(ray: Any, state: list[dict[str, Any]]) -> None:
    """One status call in flight per running run; a run whose actor has not answered yet (its
    placement group is still queued) stays "queued"."""
    for r in state:
        if r["code"] is not None:
            continue
        ref = r.get("status_ref")
        if ref is None:
            r["status_ref"] = r["actor"].status.remote()
            continue
        ready, _ = ray.wait([ref], timeout=0)
        if ready:
            r["status_ref"] = None
            with contextlib.suppress(ray.exceptions.RayError):
                r["status"] = ray.get(ref)


def _line(run: dict[str, Any]) -> str:
    config, status = run["config"], run["status"]
    total = config.learner.total_frames
    frames = status.get("frames", 0)
    evaluation = status.get("last_eval")
    note = f"  eval {evaluation[1]:.1f} at {evaluation[0]:,}" if evaluation else ""
    return (f"{config.env.task:<26} seed {config.seed:<3} {status['state']:<9} "
            f"{frames:>9,}/{total:,} frames{note}")
