"""`choreo bench envs`: environment steps per second, single process, random actions.

For each domain one representative task is stepped with uniform random actions in [-1, 1] at
its default action repeat, in states and in pixels (64x64). Construction and the first reset are
not timed; resets at episode ends are. Figures: agent steps/s and simulator frames/s
(= agent steps/s x action repeat); for pixels, agent steps/s is also renders/s.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from choreo.actors.envs import make_env

DOMAIN_TASKS = {
    "walker": "walker_walk",
    "quadruped": "quadruped_walk",
    "jaco": "jaco_reach_top_left",
    "mw": "mw_reach",
}


def measure(task: str, obs: str, steps: int, seed: int = 0) -> dict:
    """Step `task` for `steps` agent steps with random actions; return the figures."""
    env = make_env(task, obs=obs, seed=seed)
    try:
        rng = np.random.default_rng(seed)
        actions = rng.uniform(-1, 1, (steps,) + env.action_space.shape).astype(np.float32)
        env.reset(seed=seed)
        episodes = 0
        start = time.perf_counter()
        for i in range(steps):
            _, _, terminated, truncated, _ = env.step(actions[i])
            if terminated or truncated:
                env.reset()
                episodes += 1
        seconds = time.perf_counter() - start
        ar = env.unwrapped.action_repeat
    finally:
        env.close()
    return {
        "task": task,
        "obs": obs,
        "action_repeat": ar,
        "steps": steps,
        "seconds": round(seconds, 4),
        "steps_per_s": round(steps / seconds, 1),
        "frames_per_s": round(steps * ar / seconds, 1),
        "episode_ends": episodes,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="choreo bench envs", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="agent steps per domain for states (default 3000)")
    p.add_argument(
        "--pixel-steps", type=int, default=None, help="agent steps per domain for pixels (default steps/10, min 50)"
    )
    p.add_argument("--domains", default=",".join(DOMAIN_TASKS), help="comma-separated subset of " + ",".join(DOMAIN_TASKS))
    p.add_argument("--obs", default="states,pixels", help="comma-separated: states, pixels or both (default)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    return p


def run(rest_args: list[str], as_json: bool = False) -> int:
    args = _parser().parse_args(rest_args)
    as_json = as_json or args.json
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in domains if d not in DOMAIN_TASKS]
    if unknown:
        raise SystemExit(f"choreo bench envs: unknown domain(s) {unknown}; choose from {', '.join(DOMAIN_TASKS)}")
    kinds = [k.strip() for k in args.obs.split(",") if k.strip()]
    if any(k not in ("states", "pixels") for k in kinds):
        raise SystemExit(f"choreo bench envs: --obs takes states and/or pixels, got {args.obs!r}")
    pixel_steps = args.pixel_steps if args.pixel_steps is not None else max(50, args.steps // 10)

    results: dict[str, dict] = {}
    for domain in domains:
        results[domain] = {}
        for kind in kinds:
            n = args.steps if kind == "states" else pixel_steps
            r = measure(DOMAIN_TASKS[domain], kind, n)
            results[domain][kind] = r
            if not as_json:
                print(
                    f"{domain:<10} {kind:<7} {r['task']:<22} AR{r['action_repeat']}  "
                    f"{r['steps_per_s']:>9.1f} steps/s  {r['frames_per_s']:>9.1f} frames/s  ({n} steps)",
                    flush=True,
                )
    summary = "; ".join(
        f"{d} " + "/".join(f"{results[d][k]['steps_per_s']:.0f}" for k in kinds) for d in domains
    )
    summary = f"env steps/s ({'/'.join(kinds)}, single process): {summary}"
    if as_json:
        print(json.dumps({"envs": results, "summary": summary}, indent=2))
    else:
        print(summary)
    return 0
