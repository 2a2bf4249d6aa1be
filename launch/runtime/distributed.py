"""`choreo pretrain` on Ray: environment workers, replay shards and the learner as Ray actors.

    runner actors --(chunks, through the object store)--> replay shard actors --(batches)--> learner actor
          ^                                                                                       |
          +----------------------- acting weights (object store, versioned) ---------------------+

This is the Ray layer: it places the actors, dispatches their calls and recovers dead processes.
What to do next, what to count and what to print is the run core's (`launch/runtime/core.py`), and the
roles are made by the builder (`launch/runtime/build.py`) inside each actor, as in the single-process loop.
`Driver.run` is the whole data flow: a worker gets its next `collect` call only when the core's
limiter lets it insert; its chunks go from its process straight to its shard (`route`), the driver
fetching only the call's small summary; the learner gets the batches the limiter grants, draws them
from all shards on its prefetch thread, and reports how many it trained on; new weights go back to
the workers through the object store with their version.

Faults. Every process but the driver may die, and the run goes on:
- a worker whose process dies is restarted by Ray (the call in flight is retried there); one whose
  environment raises is killed and restarted. Either way the driver sees a new incarnation in the
  next summary, counts the restart and sends the current weights; only the unfinished chunks die.
- a shard whose process dies is restarted by Ray and loads its last checkpoint; the learner samples
  from the other shards meanwhile (calls to a shard time out), and the steps acknowledged by the
  dead process beyond its checkpoint are counted as lost.
- a dead learner is replaced by a new one loaded from the last checkpoint (bit-exact weights and
  optimiser state); frames never go backwards, the updates since that checkpoint are redone.
- a loss that stays NaN or infinite for `learner.max_nonfinite_updates` updates in a row stops the
  run without a final checkpoint, so the last good one stays intact.
Once a stop was asked for (a signal), nothing is restarted: the final checkpoint is written, or one
line says why not and which checkpoint is the last good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from choreo.buffer.client import route
from choreo.buffer.dataset import LoadSummary
from choreo.launch.runtime.build import (check_dataset, env_shapes, make_agent, make_learner, make_sampler, report_dataset,
                                         shard_args, startup)
from choreo.launch.runtime.config import Config, rank_batch_size
from choreo.launch.runtime.core import RunCore, RunStopped
from choreo.launch.runtime.learner_group import LearnerGroup
from choreo.launch.runtime.media import MediaSchedule, training_media
from choreo.launch.runtime.plan import resolve_plan
from choreo.launch.runtime.ray_runtime import ShardActor, connect_ray, remote_runner_class, shutdown_ray, start_local_ray
from choreo.launch.runtime.rundir import RunDir
from choreo.launch.runtime.signals import polled, signals_stop_the_run, stop_requested
from choreo.learner.learner import NonFiniteLossError
from choreo.vocabulary import WriteFailed

STATS_SECONDS = 5.0
"""Seconds between polls of the actors' and shards' statistics."""
TRAIN_CALL_SECONDS = 1.0
"""A learner call returns after this long (or once it trained on every batch it holds), so that
the driver hears of progress; a call never breaks off an update."""
SHARD_CALL_TIMEOUT = 5.0
"""Seconds the learner waits for one shard's answer before drawing those rows from the others
(a shard that Ray is restarting answers only once it has loaded its checkpoint)."""
STATS_TIMEOUT = 2.0
"""Seconds a statistics poll waits; actors that do not answer in time are skipped this round."""
MAX_RUNNER_FAILURES = 5
"""Failed calls in a row after which a worker counts as broken and the run stops (an environment
that raises on every restart would otherwise restart forever)."""
MAX_LEARNER_RESTARTS = 3
"""Learner restarts in a row, without a completed training call in between, before the run stops."""
SHARD_CPUS = 0.01
"""CPU a replay shard asks Ray for: a token share (a shard mostly waits for calls), enough for Ray's
SPREAD strategy to spread shards over nodes, which it does not for actors that ask for nothing."""


class LearnerActor:
    """Hosts the agent and a `Learner` in a Ray actor. `train(grant, frames)` adds `grant` batches
    to those the prefetch thread may draw, trains on what it holds (for about TRAIN_CALL_SECONDS),
    writes due snapshots, and returns the batches trained on, metrics, counters and the newest
    weights' reference. Batches not trained on yet stay granted for the next call.

    One rank of a learner group (`launch/runtime/learner_group.py`) when learner.num_learners > 1: it joins
    the group's process group at `address` before it builds the agent, draws its own batches of
    `rank_batch_size` from every shard, and trains in step with the other ranks; rank 0 publishes
    the weights and writes snapshots and checkpoints."""

    def __init__(self, config: Config, run_dir: str, shards: list, obs_shape: tuple[int, ...], action_dim: int,
                 resume: bool | None, rank: int = 0, address: str | None = None, node_ranks: int = 1) -> None:
        """resume: True loads the run's checkpoint, False starts afresh, None loads it if there is
        one (a replacement learner: looked for where this actor runs, which on a cluster is a
        shared filesystem's view of the run directory). node_ranks: the group's ranks on this
        rank's node, which share its cores."""
        import ray
        import torch

        from choreo.agents.choreographer.agent import resolve_device
        from choreo.learner.dist import join_group, rank_device

        # Ray gives each worker one thread (right for the environment workers); the learner
        # takes the cores it is configured for, and by default its share of its node's. Ranks that
        # together ask for more threads than the cores wait for each other's preempted threads
        # at every collective (measured at size small: 2 ranks x 2 threads on 2 cores trained 9.0
        # sequences/s, 2 x 1 thread 38.1).
        torch.set_num_threads(config.learner.threads or max(1, (os.cpu_count() or 1) // node_ranks))
        rc = config.replay
        self.rank = rank
        device = resolve_device(config.learner.device)
        if address and device.type == "cuda":  # a rank of a group sees its node's GPUs: which is its own
            device = rank_device(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        collective = join_group(rank, config.learner.num_learners, address, device,
                                timeout_s=config.learner.group_timeout_s) if address else None
        agent = make_agent(config, obs_shape, action_dim, collective=collective, device=str(device))
        sampler = make_sampler(config, shards, call=lambda shard, method, *args: getattr(shard, method).remote(*args),
                               gather=lambda refs: ray.get(refs, timeout=SHARD_CALL_TIMEOUT), rank=rank)
        batch_size = rank_batch_size(config)
        self._drawable = 0  # granted batches the prefetch thread may still draw
        self._held = 0  # granted batches not trained on yet (drawn or not)
        self._lock = threading.Lock()
        self._published: tuple[Any, int] | None = None

        def sample():
            with self._lock:
                if self._drawable <= 0:
                    return None
                self._drawable -= 1
            try:
                batch = sampler.sample(batch_size, rc.batch_length)
            except RuntimeError:  # every shard failed this time (e.g. all restarting): try again
                batch = None
            if batch is None:  # no shard has a full window yet: the grant stays drawable
                with self._lock:
                    self._drawable += 1
                time.sleep(0.01)
            return batch

        def publish(weights: dict, version: int) -> None:
            self._published = (ray.put(weights), version)

        self.learner = make_learner(config, agent, sample, publish, Path(run_dir), prefetch=2)
        self.counters: dict[str, Any] = {}
        self.restored_digest: str | None = None
        if resume is None:
            resume = RunDir(run_dir).checkpoint.exists()
        if resume:
            self.counters = self.learner.load_checkpoint()
            self.restored_digest = state_digest(agent.state_dict())
            # Nothing was drawn yet (no grant): the stream goes on after the batches trained on.
            sampler.position = self.learner.batches
        self.sampler = sampler
        self.learner.publish()
        self.train_seconds = 0.0
        self.config = config
        self.media = MediaSchedule(config.monitor.media_every, self.learner.updates)

    def info(self) -> dict[str, Any]:
        import ray
        import torch

        return {"device": str(self.learner.agent.device), "pid": os.getpid(), "threads": torch.get_num_threads(),
                "node_id": ray.get_runtime_context().get_node_id(), "updates": self.learner.updates,
                "counters": self.counters, "restored_digest": self.restored_digest, "rank": self.rank,
                "sampler_position": self.sampler.position,
                "resumed_exactly": getattr(self.learner, "resumed_exactly", True),
                "checkpoint_learners": getattr(self.learner, "checkpoint_learners", None)}

    def digest(self) -> str:
        """`state_digest` of the agent's state now, less its random generator (each rank's own):
        equal on every rank of a group."""
        state = dict(self.learner.agent.state_dict())
        extra = dict(state.get("_extra_state", {}))
        extra.pop("generator", None)
        state["_extra_state"] = extra
        return state_digest(state)

    def train(self, grant: int, frames: int) -> dict[str, Any]:
        start = time.monotonic()
        with self._lock:
            self._drawable += grant
        self._held += grant
        metrics: dict[str, float] = {}
        batches = 0
        alone = not self.learner.collective.active
        # Time spent here waiting for a granted batch is the learner's data wait. The ranks of a
        # group hold equal grants and leave together: the one whose time is up stops them all.
        while self._held > 0:
            late = time.monotonic() - start >= TRAIN_CALL_SECONDS
            if alone and late:
                break
            new = self.learner.step(timeout=0.05, stop=late)
            if new is None:
                if self.learner.group_stopped:
                    break
                continue  # granted, but not drawn yet (or the shards hold no full window yet)
            metrics = new
            batches += 1
            self._held -= 1
        snapshot, write_error = self._snapshot(frames)
        self.train_seconds += time.monotonic() - start
        media = None
        if self.rank == 0 and self.media.due(self.learner.updates) and self.learner.last_batch is not None:
            media = training_media(self.config, self.learner.agent, self.learner.last_batch)
        return {"metrics": metrics, "batches": batches, "updates": self.learner.updates,
                "weights": self._published, "wait_seconds": self.learner.wait_seconds,
                "train_seconds": self.train_seconds, "snapshot": str(snapshot) if snapshot else None,
                "write_error": write_error, "media": media}

    def _snapshot(self, frames: int) -> tuple[Path | None, str | None]:
        """The snapshot due at `frames`, written (its path) or not (why: the run goes on without it)."""
        try:
            return self.learner.maybe_snapshot(frames), None
        except WriteFailed as e:
            return None, str(e)

    def weights(self) -> tuple[Any, int] | None:
        """The newest published acting weights (object reference, version)."""
        return self._published

    def checkpoint(self, counters: dict[str, Any], ranks: list[dict[str, Any]] | None = None) -> str | None:
        """The learner state with the driver's counters (and the other ranks' `rank_state`s, on
        rank 0 of a group); first any snapshot due at the counters' frames (the last training
        call may have come before the run's final frames). Returns why that snapshot could not be
        written, if it could not; a checkpoint that cannot be written raises WriteFailed."""
        _, write_error = self._snapshot(int(counters["frames"]))
        self.learner.save_checkpoint(counters, ranks)
        return write_error

    def rank_state(self, frames: int) -> dict[str, Any]:
        """This rank's part of a group checkpoint; it also marks the snapshots due at `frames` as
        written, as rank 0 writes them."""
        self.learner.maybe_snapshot(frames)
        return self.learner.rank_state()

    def close(self) -> None:
        from choreo.learner.dist import leave_group

        self.learner.close()
        leave_group()


def state_digest(state: Any) -> str:
    """SHA-256 over a nested state dict's tensors, arrays and plain values, in key order: two
    states have the same digest iff they are bit-identical."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        import torch

        if isinstance(x, Mapping):
            for key in sorted(x, key=str):
                h.update(f"<{key}>".encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                walk(item)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


def run_distributed(config: Config, run_dir: Path, address: str | None = None, resume: bool = False,
                    dashboard: bool = False, on_tick: Callable[[Driver], None] | None = None) -> int:
    """Runs the pretraining on Ray (embedded on loopback, or the cluster at `address`); returns
    the exit code. `on_tick(driver)`, if given, is called once per loop turn (fault injection in
    tests and the soak benchmark)."""
    return drive(config, run_dir, address, resume, dashboard, on_tick).exit_code


def drive(config: Config, run_dir: Path, address: str | None = None, resume: bool = False,
          dashboard: bool = False, on_tick: Callable[[Driver], None] | None = None,
          learner_actor: type | None = None) -> Driver:
    """`run_distributed`, returning the finished `Driver` (its counters and `summary()`).
    learner_actor: the class that hosts the learner (default `LearnerActor`; tests pass a subclass)."""
    messages = RunDir(run_dir).ray_log
    if address:
        connect_ray(address, messages=messages)
    else:
        # Logical CPUs: one per environment worker, one per learner rank and one shared by the
        # shards' token shares, even on a smaller machine (they then share its cores), so that
        # any num_actors can be scheduled locally.
        cpus = (config.num_actors + config.learner.num_learners + math.ceil(config.num_shards * SHARD_CPUS)
                + (resolve_plan(config).eval_every > 0))
        start_local_ray(num_cpus=max(os.cpu_count() or 1, cpus), dashboard=dashboard, messages=messages)
    import ray  # after the start above, which sets Ray's loopback and auth settings before importing it

    with signals_stop_the_run():  # after ray.init, which installs a SIGTERM handler of its own
        try:
            driver = Driver(ray, config, Path(run_dir), resume, on_tick, learner_actor or LearnerActor)
            driver.exit_code = driver.run()
        finally:
            shutdown_ray()  # a second signal meanwhile only says that the run is stopping
    return driver


class Driver:
    """Places the actors, runs the dispatch loop, and recovers from the faults listed above; the
    run core (`self.core`) decides and counts. Public counters (frames, updates, restarts, steps
    lost) are read by tests and benchmarks."""

    def __init__(self, ray: Any, config: Config, run_dir: Path, resume: bool,
                 on_tick: Callable[[Driver], None] | None = None, learner_actor: type = LearnerActor) -> None:
        self.ray, self.config, self.run_dir, self.on_tick = ray, config, run_dir, on_tick
        self.exit_code = -1
        self.replay_dir = str(RunDir(run_dir).replay)
        # Workers spread over the cluster's nodes, shards go round-robin over them; the learner
        # takes a GPU when there is one. A run of several side by side (launch/runtime/sweep.py) runs in a
        # placement group that reserved all of it: every actor goes into the group's bundle.
        self.group = ray.util.get_current_placement_group()
        plan = resolve_plan(config)
        start = startup(config, resume, RunDir(run_dir).replay)
        # A dataset is read by the shards, which need the task's shapes before any worker exists.
        shapes = env_shapes(config) if plan.dataset else None
        shard_cls = ray.remote(num_cpus=SHARD_CPUS, max_restarts=-1, max_task_retries=-1)(ShardActor)
        self.shards = [shard_cls.options(scheduling_strategy=self._placed(self._shard_placement(i))).remote(
                           *shard_args(config, i), self.replay_dir, (config, i, *shapes) if shapes else None)
                       for i in range(config.num_shards)]
        runner_cls = remote_runner_class(num_cpus=1).options(scheduling_strategy=self._placed("SPREAD"))
        self.runners = [runner_cls.remote(config, i, config.seed) for i in range(config.num_actors)] if plan.workers else []
        self.evaluator = runner_cls.remote(config, 0, config.seed, evaluation=True) if plan.eval_every else None
        runner_info = self._wait_for([r.info.remote() for r in self.runners], "environment workers", 1.0)
        dataset_steps = 0
        self.save_replay = start.save_replay
        if start.load_dataset:
            print(f"loading dataset {config.dataset.dir} into {len(self.shards)} replay shard(s)", flush=True)
            summary = LoadSummary(warnings=check_dataset(config)[1])
            for part in ray.get([s.load_dataset.remote() for s in self.shards]):
                summary.merge(part)
            dataset_steps = report_dataset(config, summary)
        elif start.restore_replay:
            ray.get([s.resume.remote() for s in self.shards])
        if start.skip_random_steps:
            ray.get([r.skip_random_steps.remote() for r in self.runners])
        shard_info = self._wait_for([s.info.remote() for s in self.shards], "replay shards", SHARD_CPUS)
        self.obs_shape, self.action_dim = (runner_info[0]["obs_shape"], runner_info[0]["action_dim"]) if runner_info \
            else shapes
        self.runner_where = [{k: info[k] for k in ("incarnation", "node_id", "pid")} for info in runner_info]
        self.shard_where = [{k: info[k] for k in ("incarnation", "node_id", "pid")} for info in shard_info]
        self.shard_acked = [info["steps_inserted"] for info in shard_info]
        self.shard_old_incarnations: list[set[str]] = [set() for _ in self.shards]

        device = config.learner.device
        gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        world = config.learner.num_learners
        gpus = (config.learner.gpus_per_learner if world > 1 else 1) if gpu else 0
        self.learner_gpus = gpus
        self.learner_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(learner_actor)
        self.learner, learner_info = self._start_learner(start.load_checkpoint)
        self.core = RunCore(config, run_dir, num_workers=len(self.runners),
                            action_repeat=runner_info[0]["action_repeat"] if runner_info else config.env.action_repeat,
                            counters=learner_info["counters"] if start.load_checkpoint else None, updates=learner_info["updates"],
                            local=False, dataset_steps=dataset_steps)
        self.steps_per_call = config.replay.chunk_length * config.envs_per_actor

        self.collecting: dict[Any, tuple[int, Any]] = {}  # summary ref -> (worker, chunks ref)
        self.adding: dict[Any, int] = {}  # shard add ref -> shard
        self.idle: list[int] = list(range(len(self.runners)))  # workers without a call
        self.train_ref: Any = None  # the learner call in flight
        self.eval_ref: Any = None  # the evaluation in flight
        self.eval_frame = 0  # the frame it is of
        self.eval_failures = 0  # in a row
        self.weights: tuple[Any, int] | None = None  # the newest weights sent to the workers
        self._broadcast(self.learner.weights())  # the workers act with the learner's from the start
        self.runner_restarts = [0] * len(self.runners)
        self.runner_failures = [0] * len(self.runners)  # in a row
        self.runner_announced: set[int] = set()  # workers whose failure was printed, until their restart
        self.runner_versions = [-1] * len(self.runners)  # weight version of each worker's latest call
        self.shard_restarts = [0] * len(self.shards)
        self.steps_lost = 0
        self.learner_restarts = 0
        self.learner_restarts_in_a_row = 0
        self.restart_log: list[dict[str, Any]] = []
        self.nonfinite_stop: str | None = None
        self.learner_wait_seconds = self.learner_train_seconds = 0.0
        self._write_placement()
        # within 80 columns: the terminal's first lines
        workers = "no workers (offline)" if not plan.workers else \
            f"{len(self.runners)} workers x {config.envs_per_actor} envs"
        print(f"Ray: {workers}, "
              f"{len(self.shards)} shards, "
              + (f"{self.learner.world} learner ranks on {learner_info['device']} ({config.learner.scaling} scaling)"
                 if self.learner.world > 1 else f"learner on {learner_info['device']}")
              + (f"; resumed at {self.core.frames:,} frames" if resume else "") + f"; {self._placement_line()}",
              flush=True)

    @property
    def frames(self) -> int:
        return self.core.frames

    @property
    def updates(self) -> int:
        return self.core.updates

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        with polled():  # a signal becomes the KeyboardInterrupt below at the top of a loop turn
            return self._run()

    def _run(self) -> int:
        core = self.core
        last_stats = time.monotonic()
        try:
            while not core.finished and not self.nonfinite_stop and not core.stopping:
                if stop_requested():
                    raise KeyboardInterrupt
                for ref in self._ready():
                    if ref == self.train_ref:
                        self._trained(ref)
                    elif ref == self.eval_ref:
                        self._evaluated(ref)
                    elif ref in self.adding:
                        self._shard_ack(self.adding.pop(ref), ref)
                    else:
                        self._collected(*self.collecting.pop(ref), ref)
                # Workers wait while they are ahead of the learner; the learner while it is ahead of them.
                for i in [i for i in self.idle if core.may_collect(i, self.steps_per_call)]:
                    self.idle.remove(i)
                    self._dispatch(i)
                if self.train_ref is None and ((grant := core.grant()) or core.outstanding):
                    self.train_ref = self.learner.train(grant, core.frames)
                if core.eval_due():
                    self._evaluate()
                if time.monotonic() - last_stats > STATS_SECONDS:
                    last_stats = time.monotonic()
                    self._log_stats()
                if core.checkpoint_due():
                    self._periodic_checkpoint()
                if self.on_tick is not None:
                    self.on_tick(self)
                core.progress(self._fault_note())
        except KeyboardInterrupt:
            core.stop("interrupted")
            return core.finish("interrupted", self._final_checkpoint)
        except RunStopped as e:
            core.stop(str(e))
            return core.finish("stopped", self._final_checkpoint, str(e))
        if self.nonfinite_stop:
            return core.finish("nonfinite", None, self.nonfinite_stop)
        if core.stopping:  # asked from another thread (`request_stop`), as a signal would
            return core.finish("interrupted", self._final_checkpoint)
        core.stop("done")
        code = core.finish("done", self._final_checkpoint, notes=self._fault_note().strip())
        with contextlib.suppress(self.ray.exceptions.RayActorError):  # its checkpoint, if any, is written
            self.learner.close()
        return code

    def request_stop(self) -> None:
        """Stop like a signal does (final checkpoint), from another thread: the loop sees it within
        a turn. For a driver that does not own the main thread (a run of several side by side)."""
        self.core.stop("interrupted")

    def _ready(self) -> list:
        """The calls that finished: waits up to a second for one, then takes all that are done."""
        waiting = [*self.collecting, *self.adding] + [r for r in (self.train_ref, self.eval_ref) if r is not None]
        if not waiting:
            time.sleep(0.01)
            return []
        ready, _ = self.ray.wait(waiting, num_returns=1, timeout=1.0)
        if ready:
            ready, _ = self.ray.wait(waiting, num_returns=len(waiting), timeout=0)
        return ready

    def _final_checkpoint(self) -> None:
        """The training call in flight is finished first (the learner checkpoints between updates)."""
        if self.train_ref is not None:
            self._trained(self.train_ref)
            if self.nonfinite_stop:
                raise RuntimeError(f"the last updates were non-finite ({self.nonfinite_stop})")
        self.checkpoint()

    def _fault_note(self) -> str:
        parts = []
        if sum(self.runner_restarts):
            parts.append(f"{sum(self.runner_restarts)} worker restarts")
        if sum(self.shard_restarts):
            parts.append(f"{sum(self.shard_restarts)} shard restarts, {self.steps_lost:,} steps lost")
        if self.learner_restarts:
            parts.append(f"{self.learner_restarts} learner restarts")
        return "  " + ", ".join(parts) if parts else ""

    # ------------------------------------------------------------------ workers

    def _dispatch(self, i: int) -> None:
        chunks, summary = self.runners[i].collect.options(num_returns=2).remote(self.config.replay.chunk_length)
        self.collecting[summary] = (i, chunks)

    def _collected(self, i: int, chunks: Any, ref: Any) -> None:
        """Worker i's call finished: its chunks go to its shard (worker -> shard, not via the driver)."""
        try:
            summary = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self._runner_failed(i, exc)
            return
        self.runner_failures[i] = 0
        self.runner_versions[i] = summary["version"]
        if summary["incarnation"] != self.runner_where[i]["incarnation"]:
            self._runner_restarted(i, summary)
        shard = route(i, len(self.shards))
        self.adding[self.shards[shard].add_chunks.remote(chunks)] = shard
        self.core.collected(summary["steps"], summary["version"])
        self.idle.append(i)

    def _runner_failed(self, i: int, exc: BaseException) -> None:
        self.runner_failures[i] += 1
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if self.core.stopping:
            return  # nothing is restarted once a stop was asked for
        if self.runner_failures[i] >= MAX_RUNNER_FAILURES:
            self.core.collect_lost(self.steps_per_call)
            raise RunStopped(f"environment worker {i} failed {self.runner_failures[i]} times in a row; "
                             f"last error: {cause}")
        print(f"\nworker {i} failed ({cause[:50]}); restarting it", flush=True)
        self.runner_announced.add(i)  # its restart needs no second line
        if isinstance(exc, self.ray.exceptions.RayTaskError):
            # The process lives but its environments may be broken: a fresh process rebuilds them.
            self.ray.kill(self.runners[i], no_restart=False)
        self._dispatch(i)  # the same reserved steps, on the restarted process (its summary shows the new incarnation)

    def _runner_restarted(self, i: int, summary: dict[str, Any]) -> None:
        self.runner_restarts[i] += 1
        if i not in self.runner_announced:  # its process died (killed, out of memory, a lost node)
            print(f"\nworker {i} died; restarted as pid {summary['pid']} at {self.frames:,} frames, unsent "
                  f"chunks lost", flush=True)
        self.runner_announced.discard(i)
        self.runner_where[i] = {k: summary[k] for k in ("incarnation", "node_id", "pid")}
        self.restart_log.append({"role": "runner", "index": i, "frames": self.frames, **self.runner_where[i]})
        if self.weights is not None:
            self.runners[i].set_weights.remote(*self.weights)  # before its next call: calls keep their order
        self.core.monitor.scalars({f"actors/{i}/restarts": self.runner_restarts[i],
                                   "actors/restarts": sum(self.runner_restarts)}, self.core.log_step)
        self._write_placement()

    # ------------------------------------------------------------------ shards

    def _shard_ack(self, s: int, ref: Any) -> None:
        try:
            steps, incarnation = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the chunks were refused (their call failed, bad data)
            print(f"\nreplay shard {s} refused a chunk ({str(exc).strip().splitlines()[-1]})", flush=True)
            return
        if incarnation == self.shard_where[s]["incarnation"]:
            self.shard_acked[s] += steps
        elif incarnation in self.shard_old_incarnations[s]:
            self.steps_lost += steps  # acknowledged by a process that died before checkpointing them
        else:
            self._shard_restarted(s)
            self.shard_acked[s] += steps

    def _shard_restarted(self, s: int) -> None:
        info = self.ray.get(self.shards[s].info.remote())
        if info["incarnation"] == self.shard_where[s]["incarnation"]:
            return
        lost = max(self.shard_acked[s] - info["restored_inserted"], 0)
        self.steps_lost += lost
        self.shard_acked[s] = info["restored_inserted"]
        self.shard_old_incarnations[s].add(self.shard_where[s]["incarnation"])
        self.shard_where[s] = {k: info[k] for k in ("incarnation", "node_id", "pid")}
        self.shard_restarts[s] += 1
        self.restart_log.append({"role": "shard", "index": s, "frames": self.frames, "steps_lost": lost,
                                 "restore_error": info["restore_error"], **self.shard_where[s]})
        note = f"; its checkpoint could not be read: {info['restore_error']}" if info["restore_error"] else ""
        print(f"\nreplay shard {s} died; restarted from its checkpoint, {lost:,} steps lost{note}", flush=True)
        self.core.monitor.scalars({f"replay/shard{s}/restarts": self.shard_restarts[s],
                                   "replay/restarts": sum(self.shard_restarts), "replay/steps_lost": self.steps_lost},
                                  self.core.log_step)
        self._write_placement()

    # ------------------------------------------------------------------ learner

    def _trained(self, ref: Any) -> None:
        """The learner call's result; a dead learner is replaced, a loss that stayed non-finite
        ends the loop."""
        self.train_ref = None
        try:
            result = self.learner.result(ref)
        except NonFiniteLossError as exc:  # Ray re-raises the learner's error as this type
            self.nonfinite_stop = str(exc).strip().splitlines()[-1]
            return
        except self.group_failure as exc:
            self._restart_learner(exc)
            return
        self.learner_restarts_in_a_row = 0
        self.core.trained(result["batches"], result["updates"], result["metrics"])
        if result.get("media"):
            self.core.monitor.media(result["media"], self.core.log_step)
        self._broadcast(result["weights"])
        self.learner_wait_seconds, self.learner_train_seconds = result["wait_seconds"], result["train_seconds"]
        if result["write_error"]:
            self.core.write_failed(result["write_error"])
        if result["snapshot"]:
            self._periodic_checkpoint()

    def _broadcast(self, weights: tuple[Any, int] | None) -> None:
        """New acting weights (object reference, version) to every worker; their calls keep their order."""
        if weights is not None and (self.weights is None or weights[1] != self.weights[1]):
            self.weights = weights
            for r in self.runners:
                r.set_weights.remote(*weights)

    def _evaluate(self) -> None:
        """The due evaluation, on the evaluation worker with the newest weights."""
        self.evaluator.set_weights.remote(*self.weights)
        self.eval_frame = self.core.start_eval()
        self.eval_ref = self.evaluator.evaluate.remote(self.config.eval.episodes)

    def _evaluated(self, ref: Any) -> None:
        self.eval_ref = None
        try:
            returns = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # its worker died and its retries failed: due again
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            self.eval_failures += 1
            if self.eval_failures >= MAX_RUNNER_FAILURES:
                raise RunStopped(f"the evaluation failed {self.eval_failures} times in a row; last error: {cause}")
            print(f"\nthe evaluation at {self.eval_frame:,} frames failed ({cause}); it runs again", flush=True)
            self.core.eval_lost()
            return
        self.eval_failures = 0
        self.core.evaluated(self.eval_frame, returns["returns"], returns.get("skill_counts"))

    def _restart_learner(self, exc: BaseException) -> None:
        if self.core.stopping:
            raise RunStopped(f"the learner died ({type(exc).__name__}) while the run was stopping") from None
        self.learner_restarts += 1
        self.learner_restarts_in_a_row += 1
        if self.learner_restarts_in_a_row > MAX_LEARNER_RESTARTS:
            raise RunStopped(f"the learner died {self.learner_restarts_in_a_row} times in a row "
                             f"({type(exc).__name__})")
        what = "the learner" if self.learner.world == 1 else f"a rank of the {self.learner.world} learners"
        print(f"\n{what} died ({type(exc).__name__}); starting {'a new one' if self.learner.world == 1 else 'them all again'} "
              f"from the last checkpoint", flush=True)
        self.learner.kill()
        self.learner, info = self._start_learner(None)
        if info["restored_digest"] is None:
            print("there was no checkpoint yet: the new learner starts from scratch", flush=True)
        self.core.learner_replaced(info["updates"])
        self.weights = None
        self._broadcast(self.learner.weights())  # the restored weights
        self.restart_log.append({"role": "learner", "frames": self.frames, "updates": info["updates"],
                                 "digest": self.learner_digest, "digests": self.learner_restored,
                                 **self.learner_where})
        self.core.monitor.scalars({"learner/restarts": self.learner_restarts}, self.core.log_step)
        self._write_placement()

    # ------------------------------------------------------------------ checkpoints and metrics

    def checkpoint(self) -> None:
        """Replay shards and learner state, with the core's counters (frames, limiter)."""
        self._log_stats()
        # The replay first: a learner checkpoint is written only beside the replay it was trained on.
        if self.save_replay != "never":
            self.ray.get([s.save_checkpoint.remote() for s in self.shards])
            if self.save_replay == "once":
                self.save_replay = "never"
        try:
            write_error = self.learner.checkpoint(self.core.counters())
        except self.group_failure as exc:
            self._restart_learner(exc)  # raises RunStopped when the run is stopping
            return
        if write_error:
            self.core.write_failed(write_error)
        self.core.checkpointed()

    def _periodic_checkpoint(self) -> None:
        """A checkpoint that may fail for a full disk: the last good one stays, the run goes on."""
        try:
            self.checkpoint()
        except OSError as exc:  # Ray re-raises a shard's or the learner's WriteFailed as this type
            self.core.checkpoint_failed(exc)

    def _poll(self, handles: list) -> list[dict[str, Any] | None]:
        """`stats()` of each handle; None for those that did not answer within STATS_TIMEOUT."""
        refs = [h.stats.remote() for h in handles]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=STATS_TIMEOUT)
        done = set(ready)
        out = []
        for ref in refs:
            try:
                out.append(self.ray.get(ref) if ref in done else None)
            except self.ray.exceptions.RayError:
                out.append(None)
        return out

    def _log_stats(self) -> None:
        for i, st in enumerate(shard_stats := self._poll(self.shards)):
            if st is not None and st["incarnation"] != self.shard_where[i]["incarnation"]:
                self._shard_restarted(i)
        share = self.learner_wait_seconds / self.learner_train_seconds if self.learner_train_seconds else 0.0
        self.core.log([st for st in self._poll(self.runners) if st is not None], shard_stats,
                      {"learner/data_wait_s": self.learner_wait_seconds, "learner/data_wait_share": share})

    def summary(self) -> dict[str, Any]:
        """Figures of the run so far: frames, updates, restarts, steps lost, ratio, waits."""
        limiter = self.core.limiter.stats()
        return {"frames": self.frames, "updates": self.updates, "runner_restarts": sum(self.runner_restarts),
                "shard_restarts": sum(self.shard_restarts), "learner_restarts": self.learner_restarts,
                "steps_lost": self.steps_lost, "ratio": self.core.limiter.ratio(),
                "target_ratio": self.config.replay.samples_per_insert,
                "insert_wait_s": limiter["insert_wait_s"], "sample_wait_s": limiter["sample_wait_s"],
                "learner_wait_s": self.learner_wait_seconds, "learner_train_s": self.learner_train_seconds}


    # ------------------------------------------------------------------ actors and placement

    def _placed(self, strategy: Any) -> Any:
        """`strategy`, or the run's placement group when it has one."""
        if self.group is None:
            return strategy
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=0)

    def _shard_placement(self, i: int) -> Any:
        """Shard i's node: round-robin over the nodes with CPUs, GPU nodes last (the learner's
        memory is there). Ray's SPREAD strategy does not reliably spread actors that ask for almost
        nothing. The affinity is soft: a shard whose node is gone restarts on another."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in self.ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= SHARD_CPUS]
        if not nodes:  # e.g. an autoscaling cluster that has no worker node yet
            return "SPREAD"
        nodes.sort(key=lambda n: (n["Resources"].get("GPU", 0) > 0, n["NodeID"]))
        return NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)]["NodeID"], soft=True)

    def _wait_for(self, refs: list, what: str, cpus_each: float) -> list:
        """ray.get that says, every half minute, what it is waiting for (an autoscaling cluster
        may still be adding nodes; a fixed one may simply be too small)."""
        while refs:
            ready, pending = self.ray.wait(refs, num_returns=len(refs), timeout=30)
            if not pending:
                return self.ray.get(refs)
            total = self.ray.cluster_resources()
            free = self.ray.available_resources()
            print(f"waiting for {len(pending)} of {len(refs)} {what} to start (each needs {cpus_each:g} CPU; "
                  f"the cluster has {total.get('CPU', 0):g} CPUs, {free.get('CPU', 0):g} free, "
                  f"{total.get('GPU', 0):g} GPUs)", flush=True)
        return []

    @property
    def group_failure(self) -> type | tuple[type, ...]:
        """The errors of a training or checkpoint call that replace the learner: its death, or for
        a group any rank's failed call (a collective whose peer died or timed out)."""
        return self.ray.exceptions.RayActorError if self.learner.world == 1 else self.ray.exceptions.RayError

    def _start_learner(self, resume: bool | None) -> tuple[LearnerGroup, dict[str, Any]]:
        config = self.config
        group = LearnerGroup(self.ray, self.learner_cls,
                             (config, str(self.run_dir), self.shards, self.obs_shape, self.action_dim),
                             config.learner.num_learners, self.learner_gpus,
                             self._placed, config.learner.group_timeout_s)
        infos = group.start(resume, self._wait_for)
        info = infos[0]
        self.learner_where = {"node_id": info["node_id"], "pid": info["pid"]}
        self.learner_ranks = [{k: i[k] for k in ("node_id", "pid", "threads", "sampler_position")} for i in infos]
        self.learner_digest = info["restored_digest"]
        self.learner_restored = [i["restored_digest"] for i in infos]  # each rank's state as loaded
        if info["restored_digest"] is not None and not info["resumed_exactly"]:
            print(f"warning: the checkpoint was written by {info['checkpoint_learners']} learner rank(s) and "
                  f"this run has {group.world}: it resumes with the same weights, but its random draws are "
                  f"not those of an uninterrupted run", flush=True)
        return group, info

    def placement(self) -> dict[str, Any]:
        return {"learner": self.learner_where["node_id"],
                "runners": {str(i): w["node_id"] for i, w in enumerate(self.runner_where)},
                "shards": {str(i): w["node_id"] for i, w in enumerate(self.shard_where)}}

    def pids(self) -> dict[str, Any]:
        """Process ids of the learner, runners and shards as last seen (for fault injection)."""
        return {"learner": self.learner_where["pid"], "learner_ranks": [w["pid"] for w in self.learner_ranks],
                "runners": [w["pid"] for w in self.runner_where], "shards": [w["pid"] for w in self.shard_where]}

    def _write_placement(self) -> None:
        RunDir(self.run_dir).write_placement(self.placement())

    def _placement_line(self) -> str:
        nodes = {n for group in ("runners", "shards") for n in self.placement()[group].values()}
        return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}"
