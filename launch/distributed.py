"""`choreo pretrain` on Ray: environment workers, replay shards and the learner as Ray actors.

    runner actors --(chunks, through the object store)--> replay shard actors --(batches)--> learner actor
          ^                                                                                       |
          +----------------------- acting weights (object store, versioned) ---------------------+

The driver reads top to bottom like the single-process loop: it holds the rate limiter and
dispatches work. A runner is given its next `run(steps)` call only while the limiter lets actors
insert (actors wait when they are ahead); the learner is granted batches only while the limiter
lets it sample (the learner waits when it is ahead). A runner's output goes from its process to
its shard (`runner_id % num_shards`) without passing through the driver: the driver hands the
shard the object reference. The learner prefetches its granted batches from all shards on a
background thread and publishes weights through the object store with a version number.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from actors.seeding import derive_seed
from buffer.client import ReplayClient
from buffer.limiter import RateLimiter
from buffer.shard import ReplayShard
from launch.config import Config
from launch.local import REPLAY_DIR
from launch.monitor import Monitor
from launch.ray_runtime import connect_ray, remote_runner_class, shutdown_ray, start_local_ray

STATS_SECONDS = 5.0
"""Seconds between polls of the actors' and shards' statistics."""
MAX_UNTRAINED_GRANTS = 4
"""Batches granted to the learner but not yet trained on. The limiter counts a batch as sampled
when it is granted, so this bound is what makes a slow learner hold the actors back."""


class LearnerActor:
    """Hosts the agent and a `Learner` in a Ray actor. `train(grant, frames)` adds `grant` batches
    to what the prefetch thread may draw, trains on whatever is prefetched for up to `seconds`,
    writes due snapshots, and returns metrics, counters and the newest weights' reference."""

    def __init__(self, config: Config, run_dir: str, shards: list, obs_shape: tuple[int, ...], action_dim: int,
                 resume: bool) -> None:
        import ray

        from agents.registry import make_agent
        from learner.learner import Learner

        self.config = config
        rc = config.replay
        agent = make_agent(config.algo, obs_shape, action_dim, config.agent,
                           seed=derive_seed(config.seed, "learner"), device=config.learner.device)
        self.client = ReplayClient(shards, None, seed=derive_seed(config.seed, "sampler"),
                                   call=lambda shard, method, *args: getattr(shard, method).remote(*args),
                                   gather=ray.get)
        self._granted = 0
        self._lock = threading.Lock()
        self._published: tuple[Any, int] | None = None

        def sample():
            with self._lock:
                if self._granted <= 0:
                    return None
                self._granted -= 1
            batch = self.client.sample(rc.batch_size, rc.batch_length)
            if batch is None:  # no shard has a full window yet: give the grant back
                with self._lock:
                    self._granted += 1
                time.sleep(0.01)
            return batch

        def publish(weights: dict, version: int) -> None:
            self._published = (ray.put(weights), version)

        self.learner = Learner(agent, sample, publish, config.learner, Path(run_dir), prefetch=2)
        self.counters: dict[str, Any] = {}
        if resume:
            self.counters = self.learner.load_checkpoint()
        self.learner.publish()

    def info(self) -> dict[str, Any]:
        return {"device": str(self.learner.agent.device), "pid": os.getpid(), "updates": self.learner.updates,
                "counters": self.counters}

    def train(self, grant: int, frames: int, seconds: float = 1.0) -> dict[str, Any]:
        with self._lock:
            self._granted += grant
        deadline = time.monotonic() + seconds
        metrics: dict[str, float] = {}
        updates = 0
        while time.monotonic() < deadline:
            new = self.learner.step(timeout=0.05)
            if new is None:
                with self._lock:
                    if self._granted <= 0:
                        break  # every granted batch is trained on: back to the driver for more
                continue  # granted, but the shards hold no full window yet
            metrics = new
            updates += 1
        snapshot = self.learner.maybe_snapshot(frames)
        return {"metrics": metrics, "updates": updates, "total_updates": self.learner.updates,
                "version": self.learner.version, "weights": self._published,
                "wait_seconds": self.learner.wait_seconds, "snapshot": str(snapshot) if snapshot else None}

    def checkpoint(self, counters: dict[str, Any]) -> str:
        return str(self.learner.save_checkpoint(counters))

    def close(self) -> None:
        self.learner.close()


def run_distributed(config: Config, run_dir: Path, address: str | None = None, resume: bool = False,
                    dashboard: bool = False) -> int:
    if address:
        connect_ray(address)
    else:
        # Logical CPUs: one per environment worker and one for the learner, even on a smaller
        # machine (they then share its cores), so that any num_actors can be scheduled locally.
        start_local_ray(num_cpus=max(os.cpu_count() or 1, config.num_actors + 1), dashboard=dashboard)
    import ray  # after the start above, which sets Ray's loopback and auth settings before importing it

    from launch.pretrain import interrupt_on_sigterm

    interrupt_on_sigterm()

    try:
        return _drive(ray, config, run_dir, resume)
    finally:
        shutdown_ray()


def _drive(ray: Any, config: Config, run_dir: Path, resume: bool) -> int:
    rc, lc = config.replay, config.learner
    gpus = ray.cluster_resources().get("GPU", 0)
    # Workers and shards spread over the cluster's nodes; the learner takes a GPU when there is one.
    shard_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                           scheduling_strategy="SPREAD")(ReplayShard)
    shards = [shard_cls.remote(max(rc.capacity // config.num_shards, rc.batch_length), derive_seed(config.seed, "shard", i),
                               f"shard{i}") for i in range(config.num_shards)]
    runner_cls = remote_runner_class(num_cpus=1).options(scheduling_strategy="SPREAD")
    runners = [runner_cls.remote(config, i, config.seed) for i in range(config.num_actors)]
    info = ray.get([r.info.remote() for r in runners])
    if resume:
        ray.get([s.load.remote(str(run_dir / REPLAY_DIR)) for s in shards])
        ray.get([r.skip_random_steps.remote() for r in runners])
    learner_cls = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=0)(LearnerActor)
    learner = learner_cls.remote(config, str(run_dir), shards, info[0]["obs_shape"], info[0]["action_dim"], resume)
    learner_info = ray.get(learner.info.remote())
    counters = learner_info["counters"]
    frames = int(counters.get("frames", 0))
    limiter = RateLimiter(rc.samples_per_insert, rc.tolerance, rc.min_size)
    if "limiter" in counters:
        limiter.load_state_dict(counters["limiter"])
    print(f"Ray: {len(runners)} environment workers x {config.envs_per_actor} envs, {len(shards)} replay shards, "
          f"learner on {learner_info['device']}" + (f"; resumed at {frames:,} frames" if resume else ""))

    monitor = Monitor(run_dir, lc.total_frames)
    steps_per_call = rc.chunk_length
    call_steps = steps_per_call * config.envs_per_actor  # agent steps one runner call inserts
    frames_per_call = call_steps * info[0]["action_repeat"]
    batch_steps = rc.batch_size * rc.batch_length
    inflight: dict[Any, int] = {runners[i].run.remote(steps_per_call): i for i in range(len(runners))}
    idle: list[int] = []
    idle_since: dict[int, float] = {}
    grant, granted, trained = 0, 0, 0
    train_ref = None  # a learner call in flight, made only when there are batches to grant
    version, updates, last_metrics = 0, 0, {}
    last_stats = last_checkpoint = time.monotonic()
    weights_sent = -1

    def checkpoint() -> None:
        _log_stats(ray, monitor, runners, shards, limiter, frames, updates, version)
        ray.get([s.save.remote(str(run_dir / REPLAY_DIR)) for s in shards])
        ray.get(learner.checkpoint.remote({"frames": frames, "limiter": limiter.state_dict()}))

    try:
        while frames < lc.total_frames:
            waiting = [*inflight, train_ref] if train_ref is not None else list(inflight)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0) if waiting else ([], [])
            for ref in ready:
                if ref == train_ref:
                    result = ray.get(ref)
                    version, updates = result["version"], result["total_updates"]
                    trained += result["updates"]
                    if result["metrics"]:
                        last_metrics = result["metrics"]
                        monitor.scalars(last_metrics, frames)
                    if result["weights"] is not None and result["weights"][1] != weights_sent:
                        weights_ref, weights_sent = result["weights"]
                        for r in runners:
                            r.set_weights.remote(weights_ref, weights_sent)
                    if result["snapshot"]:
                        checkpoint()
                        last_checkpoint = time.monotonic()
                    monitor.scalars({"learner/wait_seconds": result["wait_seconds"]}, frames)
                    train_ref = None
                else:
                    i = inflight.pop(ref)
                    shards[i % len(shards)].add_many.remote(ref)  # runner -> shard, not via the driver
                    limiter.on_insert(call_steps)
                    frames += frames_per_call
                    idle.append(i)
                    idle_since[i] = time.monotonic()
            # Actors wait while they are ahead of the learner; the learner while it is ahead of them.
            while idle and limiter.can_insert(call_steps):
                i = idle.pop(0)
                limiter.record_wait("insert", time.monotonic() - idle_since.pop(i))
                inflight[runners[i].run.remote(steps_per_call)] = i
            while granted - trained < MAX_UNTRAINED_GRANTS and limiter.try_sample(batch_steps):
                grant += 1
                granted += 1
            if train_ref is None and grant:
                train_ref = learner.train.remote(grant, frames)
                grant = 0

            now = time.monotonic()
            if now - last_stats > STATS_SECONDS:
                last_stats = now
                _log_stats(ray, monitor, runners, shards, limiter, frames, updates, version)
            if now - last_checkpoint > 60 * lc.checkpoint_minutes:
                checkpoint()
                last_checkpoint = now
            monitor.progress(frames, updates, f"loss {last_metrics.get('world_model/loss', float('nan')):.2f}")
    except KeyboardInterrupt:
        monitor.progress(frames, updates, "interrupted: writing a checkpoint", force=True)
        try:
            if train_ref is not None:
                ray.get(train_ref)
            checkpoint()
            print(f"\ncheckpoint written; continue with: choreo pretrain --resume {run_dir}", flush=True)
        except Exception as e:  # the signal may have reached Ray's worker processes too
            print(f"\ncould not write a final checkpoint ({type(e).__name__}); the last periodic one in {run_dir} "
                  f"is intact; continue with: choreo pretrain --resume {run_dir}", flush=True)
        monitor.close()
        return 130
    if train_ref is not None:
        ray.get(train_ref)
    if inflight:
        ray.wait(list(inflight), num_returns=len(inflight), timeout=30)
    checkpoint()
    monitor.progress(frames, updates, "done", force=True)
    monitor.close()
    ray.get(learner.close.remote())
    print(f"\nfinished: {frames:,} frames, {updates:,} updates; run directory {run_dir}")
    return 0


def _log_stats(ray: Any, monitor: Monitor, runners: list, shards: list, limiter: RateLimiter, frames: int,
               updates: int, version: int) -> None:
    runner_stats = ray.get([r.stats.remote() for r in runners])
    shard_stats = ray.get([s.stats.remote() for s in shards])
    scalars: dict[str, float] = {}
    total_sps = 0.0
    for st in runner_stats:
        rid = st["runner_id"]
        scalars[f"actors/{rid}/steps_per_second"] = st["steps_per_second"]
        scalars[f"actors/{rid}/policy_lag"] = float(version - st["version"])
        total_sps += st["steps_per_second"]
        for episode_return, length in st["episodes"]:
            monitor.scalars({"episode/return": episode_return, "episode/length": length}, frames)
    scalars["actors/steps_per_second"] = total_sps
    scalars["actors/policy_lag"] = float(sum(version - st["version"] for st in runner_stats) / len(runner_stats))
    for i, st in enumerate(shard_stats):
        scalars[f"replay/shard{i}/steps"] = st["steps"]
        scalars[f"replay/shard{i}/inserted_steps"] = st.get("steps_inserted", 0)
        scalars[f"replay/shard{i}/sampled_steps"] = st.get("steps_sampled", 0)
    scalars["replay/steps"] = sum(st["steps"] for st in shard_stats)
    scalars["replay/ratio"] = limiter.ratio()
    limiter_stats = limiter.stats()
    scalars.update({f"limiter/{k}": float(v) for k, v in limiter_stats.items() if isinstance(v, (int, float))})
    scalars["learner/weight_version"] = version
    scalars["learner/updates"] = updates
    scalars["throughput/frames_per_second"], scalars["throughput/updates_per_second"] = monitor.rates(frames, updates)
    monitor.scalars(scalars, frames)
