"""`choreo pretrain --local`: every role in this one process, no Ray. The same components as the
distributed run (EnvRunner, ReplayShard, RateLimiter, Learner), wired in one loop that reads
top to bottom; useful for debugging and for machines where Ray is not wanted.

In one thread inserts can never wait for samples (that would deadlock), so the limiter only
holds the learner back: it trains while the sampled/inserted ratio is below its target.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from choreo.actors.runner import make_runner
from choreo.vocabulary import derive_seed
from choreo import vocabulary as B
from choreo.agents.registry import make_agent
from choreo.buffer.limiter import RateLimiter
from choreo.buffer.shard import ReplayShard
from choreo.launch.config import Config
from choreo.launch.monitor import Monitor, loss_note
from choreo.learner.learner import CHECKPOINT, Learner, NonFiniteLossError

REPLAY_DIR = "replay"


def run_local(config: Config, run_dir: Path, resume: bool = False) -> int:
    rc, lc = config.replay, config.learner
    runner = make_runner(config, runner_id=0, seed=config.seed, num_runners=1)
    agent = make_agent(config.algo, runner.obs_shape, runner.action_dim, config.agent,
                       seed=derive_seed(config.seed, "learner"), device=lc.device)
    shard = ReplayShard(rc.capacity, seed=derive_seed(config.seed, "shard", 0))
    limiter = RateLimiter(rc.samples_per_insert, rc.tolerance, rc.min_size)
    sampler = np.random.default_rng(derive_seed(config.seed, "sampler"))
    batch_steps = rc.batch_size * rc.batch_length

    def sample():
        if not limiter.can_sample(batch_steps) or shard.num_windows(rc.batch_length) == 0:
            return None
        limiter.on_sample(batch_steps)
        return shard.sample(rc.batch_size, rc.batch_length, sampler)

    learner = Learner(agent, sample, runner.set_weights, lc, run_dir, prefetch=0, run_config=config)
    frames = 0
    if resume:
        counters = learner.load_checkpoint()
        frames = int(counters["frames"])
        limiter.load_state_dict(counters["limiter"])
        shard.load(run_dir / REPLAY_DIR)
        runner.skip_random_steps()  # the seed phase happened before the interruption
        print(f"resumed {run_dir} at {frames:,} frames, {learner.updates:,} updates, "
              f"{shard.stats()['steps']:,} steps in replay")
    learner.publish()

    monitor = Monitor(run_dir, lc.total_frames)
    frames_per_step = config.env.action_repeat * len(runner.envs)
    last_checkpoint = time.monotonic()
    metrics: dict[str, float] = {}

    def checkpoint() -> None:
        learner.save_checkpoint({"frames": frames, "limiter": limiter.state_dict()})
        shard.save(run_dir / REPLAY_DIR)

    try:
        while frames < lc.total_frames:
            for stream, chunk in runner.step():
                shard.add(chunk, stream)
                limiter.on_insert(len(chunk[B.REWARD]))
                lag = learner.version - chunk[B.POLICY_VERSION][chunk[B.POLICY_VERSION] >= 0]
                if lag.size:
                    monitor.scalars({"actors/policy_lag": float(lag.mean())}, frames)
            frames += frames_per_step

            while (new := learner.step(timeout=0)) is not None:
                metrics = new
                if learner.updates % lc.log_every == 0:
                    monitor.scalars(metrics, frames)

            stats = runner.stats()
            for episode_return, length in stats["episodes"]:
                monitor.scalars({"episode/return": episode_return, "episode/length": length}, frames)
            if learner.updates and learner.updates % lc.log_every == 0 or stats["episodes"]:
                fps, ups = monitor.rates(frames, learner.updates)
                replay = shard.stats()
                monitor.scalars({
                    "actors/steps_per_second": stats["steps_per_second"],
                    "replay/steps": replay["steps"],
                    "replay/ratio": limiter.ratio(),
                    "learner/updates": learner.updates,
                    "learner/weight_version": learner.version,
                    "throughput/frames_per_second": fps,
                    "throughput/updates_per_second": ups,
                }, frames)
            if learner.maybe_snapshot(frames) is not None or time.monotonic() - last_checkpoint > 60 * lc.checkpoint_minutes:
                checkpoint()
                last_checkpoint = time.monotonic()
            monitor.progress(frames, learner.updates, loss_note(metrics))
    except NonFiniteLossError as e:
        monitor.progress(frames, learner.updates, "stopped", force=True)
        monitor.close()
        learner.close()
        print(f"\nthe run stopped: {e}\nno checkpoint was written after the non-finite updates; "
              f"the last good one is {run_dir / CHECKPOINT}")
        return 1
    except KeyboardInterrupt:
        monitor.progress(frames, learner.updates, "interrupted: writing a checkpoint", force=True)
        checkpoint()
        monitor.close()
        learner.close()
        print(f"\ncheckpoint written; continue with: choreo pretrain --local --resume {run_dir}")
        return 130
    checkpoint()
    monitor.progress(frames, learner.updates, "done", force=True)
    monitor.close()
    learner.close()
    print(f"\nfinished: {frames:,} frames, {learner.updates:,} updates; run directory {run_dir}")
    return 0


__all__ = ["run_local", "CHECKPOINT"]
