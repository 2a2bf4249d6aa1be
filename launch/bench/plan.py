"""`choreo bench plan`: milliseconds per planning step of `choreo plan`, for DADS (MPPI over
continuous skills with the skill dynamics) and for Choreographer (over its codebook skills with the
world model's imagination), at their reference sizes and the paper's planner settings (K = 50
candidates, R = 10 iterations, H_P = 1 segment held H_Z = 10 steps; `agent.planner.*` to
change them).

The agent has random weights (the cost does not depend on them) and plans for N environments of
the task at once; a planning step is a policy call in which every environment replans (every H_Z
steps), an acting step one in which none does. Prints both, per call and per environment. A
figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def run(rest: list[str], as_json: bool = False) -> int:
    from choreo.agents.planning import CodebookPlanningPolicy, DadsPlanningPolicy
    from choreo.agents.registry import make_agent
    from choreo.launch.runtime.build import env_shapes
    from choreo.launch.runtime.config import load_config

    p = argparse.ArgumentParser(prog="choreo bench plan")
    p.add_argument("--algo", choices=["dads", "choreographer"], default="dads")
    p.add_argument("--envs", type=int, default=10, help="environments planned for in one call (default 10)")
    p.add_argument("--plans", type=int, default=5, help="timed planning steps")
    p.add_argument("--preset", default="paper", help="size preset (paper or tiny)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. task=ant_nav agent.planner.candidates=200")
    args = p.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config([args.preset], [f"algo={args.algo}", "env.task=point_mass_nav", *args.overrides])
    obs_shape, action_dim = env_shapes(config)
    agent = make_agent(config.algo, obs_shape, action_dim, config.agent, seed=0, device="cpu")
    agent.eval()
    cfg = config.agent.planner
    goals = torch.zeros(args.envs, 2)

    def reward(observations: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        return -(observations[..., :2] - goals[env][:, None, None]).norm(dim=-1)

    cls = DadsPlanningPolicy if config.algo == "dads" else CodebookPlanningPolicy
    policy = cls(agent, reward, cfg, seed=0)
    rng = np.random.default_rng(0)
    state = policy.initial_state(args.envs)
    plans, acts = [], []
    first = np.ones(args.envs, bool)
    for step in range(args.plans * cfg.hold + 1):
        obs = rng.normal(size=(args.envs, *obs_shape)).astype(np.float32)
        start = time.perf_counter()
        _, state, _ = policy.act(obs, first, state, mode="mode")
        (plans if step % cfg.hold == 0 else acts).append((time.perf_counter() - start) * 1000)
        first[:] = False
    plans = plans[1:] or plans  # the first call also warms up
    results = {"algo": config.algo, "task": config.env.task, "envs": args.envs, "candidates": cfg.candidates,
               "iterations": cfg.iterations, "horizon": cfg.horizon, "hold": cfg.hold,
               "threads": torch.get_num_threads(), "plan_ms": statistics.median(plans),
               "act_ms": statistics.median(acts) if acts else 0.0}
    if as_json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"planning benchmark: {config.algo} ({args.preset} sizes) on {config.env.task}, {args.envs} environments, "
          f"K={cfg.candidates} R={cfg.iterations} H_P={cfg.horizon} H_Z={cfg.hold}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"planning step: {results['plan_ms']:.0f} ms per call, {results['plan_ms'] / args.envs:.1f} ms per "
          f"environment; acting step: {results['act_ms']:.1f} ms per call")
    return 0
