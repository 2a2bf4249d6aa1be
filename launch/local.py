"""`--local`: every role in this one process, no Ray, for every mode (pretraining, fine-tuning).
The roles come from the builder and the decisions from the run core, as on Ray; the loop only
moves the data. Useful for debugging and for machines where Ray is not wanted.

In one thread the two sides take turns: the worker steps its environments when the limiter lets
it insert, and the learner trains on the batches the limiter grants, one at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

from choreo.launch.build import make_agent, make_eval_runner, make_learner, make_runner, make_sampler, make_shard
from choreo.launch.config import Config
from choreo.launch.core import RunCore
from choreo.learner.learner import CHECKPOINT, NonFiniteLossError

REPLAY_DIR = "replay"
STATS_SECONDS = 5.0
"""Seconds between two writes of the periodic scalars."""


def run_local(config: Config, run_dir: Path, resume: bool = False) -> int:
    rc = config.replay
    runner = make_runner(config, runner_id=0, num_runners=1)
    evaluator = make_eval_runner(config) if config.eval.every_frames else None
    agent = make_agent(config, runner.obs_shape, runner.action_dim, start=not resume)
    shard = make_shard(config, 0)
    sampler = make_sampler(config, [shard])

    def publish(weights: dict, version: int) -> None:
        for r in filter(None, (runner, evaluator)):
            r.set_weights(weights, version)

    learner = make_learner(config, agent, lambda: sampler.sample(rc.batch_size, rc.batch_length),
                           publish, run_dir, prefetch=0)  # replay is read in this thread
    counters = None
    if resume:
        counters = learner.load_checkpoint()
        shard.load(run_dir / REPLAY_DIR)
        runner.skip_random_steps()  # the seed phase happened before the interruption
        print(f"resumed {run_dir} at {int(counters['frames']):,} frames, {learner.updates:,} updates, "
              f"{shard.stats()['steps']:,} steps in replay")
    core = RunCore(config, run_dir, num_workers=1, action_repeat=config.env.action_repeat, counters=counters,
                   updates=learner.updates, local=True)
    learner.publish()
    steps_per_call = len(runner.envs)

    def checkpoint() -> None:
        learner.save_checkpoint(core.counters())
        shard.save(run_dir / REPLAY_DIR)
        core.checkpointed()

    last_stats = time.monotonic()
    try:
        while not core.finished:
            if core.eval_due():
                core.evaluated(core.start_eval(), evaluator.evaluate(config.eval.episodes)["returns"])
            if core.may_collect(0, steps_per_call):
                for stream, chunk in runner.step():
                    shard.add(chunk, stream)
                core.collected(steps_per_call, runner.version)
            while core.grant():
                metrics = learner.step()
                if metrics is None:  # the replay holds no full window yet
                    core.release(1)
                    break
                core.trained(1, learner.updates, metrics if learner.updates % config.learner.log_every == 0 else None)
            stats = runner.stats()
            if stats["episodes"] or time.monotonic() - last_stats > STATS_SECONDS:
                last_stats = time.monotonic()
                core.log([stats], [shard.stats()])
            if learner.maybe_snapshot(core.frames) is not None or core.checkpoint_due():
                checkpoint()
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


__all__ = ["run_local", "CHECKPOINT", "REPLAY_DIR"]
