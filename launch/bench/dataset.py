"""`choreo bench dataset`: steps per second loading an offline dataset into replay shards.

Writes a synthetic ExORL-style dataset (walker's shapes: 24-dim states, 6-dim actions, the
simulator's physics states; episodes of 1001 steps as ExORL stores them) into a temporary folder,
then loads it into 1, 2, ... replay shards as a pretraining does: in this process for one shard,
and as Ray shard actors (each loading its part, in parallel) for every shard count. With
`--obs pixels` the frames are rendered from the stored physics states while loading. Prints steps
per second; a figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

EPISODE_STEPS = 1001


def write_dataset(directory: Path, episodes: int, seed: int = 0) -> int:
    """Synthetic walker episodes with physics states that render (small joint angles)."""
    from choreo.actors.envs import make_env

    env = make_env("walker_stand", obs="states", seed=seed)
    env.reset(seed=seed)
    size = env.unwrapped.physics.get_state().shape[0]
    env.close()
    rng = np.random.default_rng(seed)
    for i in range(episodes):
        physics = 0.1 * rng.standard_normal((EPISODE_STEPS, size))
        physics[:, 1] += 1.2  # the torso's height: standing in view
        np.savez(directory / f"{i:06d}_{EPISODE_STEPS}.npz",
                 observation=rng.standard_normal((EPISODE_STEPS, 24)).astype(np.float32),
                 action=rng.uniform(-1, 1, (EPISODE_STEPS, 6)).astype(np.float32),
                 reward=rng.random((EPISODE_STEPS, 1)).astype(np.float32),
                 discount=np.ones((EPISODE_STEPS, 1), np.float32), physics=physics)
    return episodes * EPISODE_STEPS


def run(rest: list[str], as_json: bool = False) -> int:
    from choreo.launch.runtime.build import env_shapes, load_dataset_part, make_shard, shard_args
    from choreo.launch.runtime.config import load_config

    p = argparse.ArgumentParser(prog="choreo bench dataset")
    p.add_argument("--obs", choices=["states", "pixels"], default="states",
                   help="pixels: render the frames from the stored physics states while loading")
    p.add_argument("--episodes", type=int, default=0, help="episodes of 1001 steps (default 200 states, 8 pixels)")
    p.add_argument("--shards", default="1,2", help="comma-separated shard counts to load into on Ray")
    args = p.parse_args(rest)
    episodes = args.episodes or (200 if args.obs == "states" else 8)
    results: dict = {"obs": args.obs, "episodes": episodes, "steps": episodes * EPISODE_STEPS, "ray": {}}
    with tempfile.TemporaryDirectory(prefix="choreo-bench-dataset-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write_dataset(folder, episodes)
        print(f"dataset benchmark: {episodes} episodes x {EPISODE_STEPS} steps of walker ({args.obs}), written in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        presets = ["pixels"] if args.obs == "pixels" else []
        base = [f"dataset.dir={folder}", f"replay.capacity={episodes * EPISODE_STEPS * 2}"]
        config = load_config(presets, base + ["num_shards=1"])
        shapes = env_shapes(config)
        start = time.perf_counter()
        summary = load_dataset_part(config, make_shard(config, 0), 0, *shapes)
        seconds = time.perf_counter() - start
        results["in_process"] = summary.steps / seconds
        print(f"  1 shard in this process: {summary.steps / seconds:,.0f} steps/s ({seconds:.1f} s)", flush=True)

        import ray

        from choreo.launch.runtime.ray_runtime import ShardActor, shutdown_ray, start_local_ray

        counts = [int(x) for x in args.shards.split(",") if x.strip()]
        start_local_ray(num_cpus=max(counts) + 1)
        try:
            for n in counts:
                config = load_config(presets, base + [f"num_shards={n}"])
                actor = ray.remote(num_cpus=1)(ShardActor)
                shards = [actor.remote(*shard_args(config, i), str(folder / "replay"), (config, i, *shapes))
                          for i in range(n)]
                ray.get([s.info.remote() for s in shards])
                start = time.perf_counter()
                loaded = sum(part["steps"] for part in ray.get([s.load_dataset.remote() for s in shards]))
                seconds = time.perf_counter() - start
                results["ray"][n] = loaded / seconds
                print(f"  {n} Ray shard actor{'s' if n > 1 else ''}: {loaded / seconds:,.0f} steps/s ({seconds:.1f} s)",
                      flush=True)
                for s in shards:
                    ray.kill(s)
        finally:
            shutdown_ray()
    if as_json:
        print(json.dumps(results, indent=2))
    return 0
