"""`--local`: every role in this one process, no Ray, for every mode (pretraining online, offline
or both, fine-tuning).
The roles come from the builder and the decisions from the run core, as on Ray; the loop only
moves the data. Useful for debugging and for machines where Ray is not wanted.

In one thread the two sides take turns: the worker steps its environments when the limiter lets
it insert, and the learner trains on the batches the limiter grants, one at a time. Torch uses
`learner.threads` CPU threads (0: every core), as the learner does on Ray, for the run's duration.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from choreo.launch.runtime.build import (env_shapes, load_dataset, make_agent, make_eval_runner, make_learner, make_runner,
                                         make_sampler, make_shard, startup)
from choreo.launch.runtime.config import Config
from choreo.launch.runtime.core import MAX_OUTSTANDING_BATCHES, RunCore
from choreo.launch.runtime.media import MediaSchedule, training_media
from choreo.launch.runtime.plan import resolve_plan
from choreo.launch.runtime.rundir import RunDir
from choreo.launch.runtime.signals import polled, stop_requested
from choreo.learner.learner import NonFiniteLossError
from choreo.vocabulary import WriteFailed

STATS_SECONDS = 5.0
"""Seconds between two writes of the periodic scalars."""


@contextlib.contextmanager
def learner_threads(config: Config) -> Iterator[int]:
    """Torch's CPU threads set to `config.learner.threads` (0: all cores), as the Ray learner
    sets them (launch/runtime/distributed.py); the previous count comes back afterwards. Yields the count."""
    import torch

    previous = torch.get_num_threads()
    threads = config.learner.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def run_local(config: Config, run_dir: Path, resume: bool = False) -> int:
    """Runs the mode of `config` in this process, in `run_dir` (continuing it with `resume`);
    returns the exit status."""
    with learner_threads(config), polled():  # a signal becomes a KeyboardInterrupt between steps
        return _run(config, run_dir, resume)


def _run(config: Config, run_dir: Path, resume: bool) -> int:
    rc, plan = config.replay, resolve_plan(config)
    runner = make_runner(config, runner_id=0, num_runners=1) if plan.workers else None
    obs_shape, action_dim = env_shapes(config) if runner is None else (runner.obs_shape, runner.action_dim)
    evaluator = make_eval_runner(config) if plan.eval_every else None
    start = startup(config, resume, RunDir(run_dir).replay)
    agent = make_agent(config, obs_shape, action_dim, start=not start.load_checkpoint)
    shard = make_shard(config, 0)
    sampler = make_sampler(config, [shard])
    dataset_steps = load_dataset(config, [shard], obs_shape, action_dim) if start.load_dataset else 0
    save_replay = start.save_replay != "never"

    def publish(weights: dict, version: int) -> None:
        for r in filter(None, (runner, evaluator)):
            r.set_weights(weights, version)

    learner = make_learner(config, agent, lambda: sampler.sample(rc.batch_size, rc.batch_length),
                           publish, run_dir, prefetch=0)  # replay is read in this thread
    counters = None
    if start.load_checkpoint:
        counters = learner.load_checkpoint()
        sampler.position = learner.batches  # the batches it would have drawn next
        if start.restore_replay:
            shard.load(RunDir(run_dir).replay)
        if runner is not None and start.skip_random_steps:
            runner.skip_random_steps()
        print(f"resumed {run_dir} at {int(counters['frames']):,} frames, {learner.updates:,} updates, "
              f"{shard.stats()['steps']:,} steps in replay")
    core = RunCore(config, run_dir, num_workers=1, action_repeat=config.env.action_repeat, counters=counters,
                   updates=learner.updates, local=True, dataset_steps=dataset_steps)
    learner.publish()
    media = MediaSchedule(config.monitor.media_every, learner.updates)
    steps_per_call = len(runner.envs) if runner is not None else 0

    def checkpoint() -> None:
        nonlocal save_replay
        # The replay first: a learner checkpoint is written only beside the replay it was trained on.
        if save_replay:
            shard.save(RunDir(run_dir).replay)
            save_replay = start.save_replay == "every checkpoint"
        learner.save_checkpoint(core.counters())
        core.checkpointed()

    last_stats = time.monotonic()
    try:
        while not core.finished:
            if stop_requested():
                raise KeyboardInterrupt
            if core.eval_due():
                frame, result = core.start_eval(), evaluator.evaluate(config.eval.episodes)
                core.evaluated(frame, result["returns"], result.get("skill_counts"))
            if runner is not None and core.may_collect(0, steps_per_call):
                for stream, chunk in runner.step():
                    shard.add(chunk, stream)
                core.collected(steps_per_call, runner.version)
            for _ in range(MAX_OUTSTANDING_BATCHES):  # then back to the worker, the logs and the checkpoints
                if stop_requested() or not (core.grant() or core.outstanding):
                    break
                metrics = learner.step()
                if metrics is None:  # the replay holds no full window yet
                    core.release(core.outstanding)
                    break
                core.trained(1, learner.updates, metrics if learner.updates % config.learner.log_every == 0 else None)
            if media.due(learner.updates) and learner.last_batch is not None:
                core.monitor.media(training_media(config, agent, learner.last_batch), core.log_step)
            stats = runner.stats() if runner is not None else None
            if (stats and stats["episodes"]) or time.monotonic() - last_stats > STATS_SECONDS:
                last_stats = time.monotonic()
                core.log([stats] if stats else [], [shard.stats()])
            try:
                snapshot = learner.maybe_snapshot(core.frames)
            except WriteFailed as e:
                snapshot = None
                core.write_failed(str(e))
            if snapshot is not None or core.checkpoint_due():
                try:
                    checkpoint()
                except OSError as e:  # a full disk: the last good checkpoint stays, the run goes on
                    core.checkpoint_failed(e)
            core.progress()
    except NonFiniteLossError as e:
        learner.close()
        return core.finish("nonfinite", None, str(e))
    except KeyboardInterrupt:
        core.stop("interrupted")
        result = core.finish("interrupted", checkpoint)
        learner.close()
        return result
    result = core.finish("done", checkpoint)
    learner.close()
    return result


__all__ = ["run_local"]
