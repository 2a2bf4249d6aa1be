"""`choreo bench actors`: agent steps per second of the environment workers, against the raw
environment.

Measured, on one task (default walker_walk from states), in agent steps per second summed over
all environments:
  (a) raw: one environment stepped with uniform random actions in a plain loop;
  (b) one EnvRunner in this process (one torch thread, as in a worker): in its random seed phase
      (the runner's own overhead) and acting with the tiny-preset policy, one batched policy call
      per step, for each `--envs` count;
  (c) 1 and 2 EnvRunners in Ray actors (embedded Ray on 127.0.0.1, one CPU per actor), acting with
      the tiny policy, the chunks returned to the driver as a trainer would receive them.
Each figure is the best of `--repeats` timed runs (the median is shown beside it): on a shared
machine the best is the least disturbed by other processes. "x raw" is the ratio to (a); on a
machine with c free cores, k <= c actors can reach k x raw.
Construction, the first steps and Ray's start are not timed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

TINY = "tiny"


def _config(task: str, obs: str, envs: int, seed_frames: int = 0):
    from choreo.launch.runtime.config import load_config

    presets = [TINY] + (["pixels"] if obs == "pixels" else [])
    return load_config(presets, [f"env.task={task}", f"envs_per_actor={envs}", f"learner.seed_frames={seed_frames}",
                                 "num_actors=1"])


def _best(rates: list[float]) -> tuple[float, float]:
    """(best, median) of repeated rates: the best is the one least disturbed by other processes."""
    return max(rates), float(np.median(rates))


def measure_raw(config, steps: int, repeats: int = 3, seed: int = 0) -> tuple[float, float]:
    from choreo.actors.envs import make_env_from_config

    env = make_env_from_config(config.env, seed=seed)
    try:
        actions = np.random.default_rng(seed).uniform(-1, 1, (steps, *env.action_space.shape)).astype(np.float32)
        env.reset(seed=seed)
        for i in range(20):
            env.step(actions[i])
        env.reset()
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(steps):
                _, _, terminated, truncated, _ = env.step(actions[i])
                if terminated or truncated:
                    env.reset()
            rates.append(steps / (time.perf_counter() - start))
        return _best(rates)
    finally:
        env.close()


def measure_runner(config, steps: int, repeats: int = 3) -> tuple[float, float]:
    """Agent steps/s of one in-process runner; its random seed phase covers the timed steps when
    `config.learner.seed_frames` says so (see `_config`), else the policy acts throughout."""
    from choreo.launch.runtime.build import make_runner

    n = config.envs_per_actor
    calls = max(1, steps // n)
    runner = make_runner(config, runner_id=0, seed=0)
    try:
        runner.run(20)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.run(calls)
            rates.append(calls * n / (time.perf_counter() - start))
        return _best(rates)
    finally:
        runner.close()


def measure_ray(config, steps: int, actors: int, repeats: int = 3) -> tuple[float, float]:
    import ray

    from choreo.launch.runtime.ray_runtime import remote_runner_class

    n = config.envs_per_actor
    calls = max(1, steps // n)
    cls = remote_runner_class(num_cpus=1)
    handles = [cls.remote(config, i, 0, num_runners=actors) for i in range(actors)]
    try:
        ray.get([h.skip_random_steps.remote() for h in handles])
        ray.get([h.run.remote(20) for h in handles])
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            results = ray.get([h.run.remote(calls) for h in handles])
            rates.append(actors * calls * n / (time.perf_counter() - start))
            assert all(results), "no chunks came back"
        return _best(rates)
    finally:
        for h in handles:
            ray.kill(h)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"choreo bench actors: {name} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"choreo bench actors: {name} needs positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="choreo bench actors", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="walker_walk", help="environment id (default walker_walk)")
    p.add_argument("--obs", choices=["states", "pixels"], default="states")
    p.add_argument("--steps", type=int, default=5000, help="timed agent steps per measurement and actor (default 5000)")
    p.add_argument("--envs", default="1,16", help="environments per runner, comma-separated (default 1,16)")
    p.add_argument("--actors", default="1,2", help="Ray actor counts, comma-separated (default 1,2; empty: no Ray)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported (default 3)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all cores)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    return p


def run(rest: list[str], as_json: bool = False) -> int:
    args = _parser().parse_args(rest)
    as_json = as_json or args.json
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("choreo bench actors: --steps and --repeats must be positive")
    envs_counts = _ints(args.envs, "--envs")
    actor_counts = _ints(args.actors, "--actors") if args.actors.strip() else []

    import torch

    torch.set_num_threads(1)  # as in a worker (OMP_NUM_THREADS=1)
    base = _config(args.task, args.obs, 1)
    ar = base.env.action_repeat
    rows: list[dict] = []

    def report(what: str, envs: int, actors: int, rates: tuple[float, float]) -> None:
        rate, median = rates
        row = {"what": what, "envs_per_runner": envs, "actors": actors, "steps_per_s": round(rate, 1),
               "median_steps_per_s": round(median, 1), "frames_per_s": round(rate * ar, 1),
               "x_raw": round(rate / raw[0], 3)}
        rows.append(row)
        if not as_json:
            print(f"{what:<28} {envs:>5} {actors:>6} {rate:>12.0f} {median:>12.0f} {row['x_raw']:>7.2f}", flush=True)

    if not as_json:
        print(f"{args.task} {args.obs}, action repeat {ar}, {TINY} policy, "
              f"best and median of {args.repeats} x {args.steps} timed agent steps")
        print(f"{'':<28} {'envs':>5} {'actors':>6} {'steps/s':>12} {'median':>12} {'x raw':>7}")
    raw = measure_raw(base, args.steps, args.repeats)
    report("raw env, random actions", 1, 0, raw)
    for n in envs_counts:
        seed_frames = (args.repeats * (args.steps // n) + 20) * n * ar  # a seed phase as long as the measurement
        report("EnvRunner, random phase", n, 0, measure_runner(_config(args.task, args.obs, n, seed_frames), args.steps,
                                                                     args.repeats))
        report("EnvRunner, tiny policy", n, 0, measure_runner(_config(args.task, args.obs, n), args.steps, args.repeats))

    if actor_counts:
        from choreo.launch.runtime.ray_runtime import shutdown_ray, start_local_ray

        start_local_ray(num_cpus=args.num_cpus)
        try:
            for n in envs_counts:
                for k in actor_counts:
                    rate = measure_ray(_config(args.task, args.obs, n), args.steps, k, args.repeats)
                    report(f"Ray, {k} actor{'s' if k > 1 else ''}, tiny policy", n, k, rate)
        finally:
            shutdown_ray()

    if as_json:
        print(json.dumps({"task": args.task, "obs": args.obs, "action_repeat": ar, "steps": args.steps,
                          "results": rows}, indent=2))
    return 0
