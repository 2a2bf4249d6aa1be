"""`choreo bench learner`: milliseconds per learner update at the paper's sizes, by part.

Builds the agent of the resolved config (suite and size presets; `algo=dads` for DADS at its
reference sizes, on Ant's shapes), feeds it random batches of the configured shape (50 x 50 at
paper size, 256 pairs for DADS), and prints the mean time per pretraining update and
per fine-tuning update (with --offline also per offline-only pretraining update), broken down by
part, and the peak memory. A figure, not a test.

With --learners W (Choreographer's pretraining), W processes train one agent as a learner group
(`choreo.learner.dist`: gloo on CPUs, NCCL with one GPU per rank), each on its own batch of the
configured size (weak scaling), after the same timing with one process: ms per update, updates/s
and sequences/s against one, and the time of the gradient all-reduce alone (every parameter
that takes gradients, in one buffer: about what the optimizers send in an update).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch

from choreo.launch.runtime.build import random_batch

# Walker's shapes: 24-dim states, 6-dim actions; pixels are 3 x 64 x 64.
STATE_DIM, ACTION_DIM = 24, 6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _measure(agent, batches: list[dict], warmup: int, label: str) -> dict[str, float]:
    for i in range(warmup):
        agent.update(batches[i % len(batches)])
    totals, parts = [], {}
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        metrics = agent.update(batch)
        if agent.device.type == "cuda":
            torch.cuda.synchronize()
        totals.append((time.perf_counter() - start) * 1000.0)
        for key, value in metrics.items():
            if key.startswith("time/") and key.endswith("_s"):  # seconds; this report is in milliseconds
                parts.setdefault(key[len("time/"):-len("_s")], []).append(1000.0 * value)
        print(f"  {label} update {i + 1}/{len(batches)}: {totals[-1]:.0f} ms", flush=True)
    out = {"total_ms": statistics.mean(totals)}
    out.update({f"{name}_ms": statistics.mean(v) for name, v in parts.items()})
    return out


def run(rest: list[str], as_json: bool = False) -> int:
    from choreo.agents.registry import make_agent
    from choreo.launch.runtime.config import load_config

    p = argparse.ArgumentParser(prog="choreo bench learner")
    p.add_argument("--obs", choices=["states", "pixels"], default="states")
    p.add_argument("--preset", default="paper", help="size preset (paper or tiny)")
    p.add_argument("--updates", type=int, default=3, help="timed updates of each kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--learners", type=int, default=1,
                   help="also time W learner ranks (processes) training together, against one")
    p.add_argument("--offline", action="store_true",
                   help="also time the update of an offline-only pretraining (no exploration actor-critic)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config([args.obs, args.preset], args.overrides)
    if args.learners > 1:
        return compare_learners(args, config, as_json)
    dads = config.algo == "dads"
    if dads:  # Ant with its x-y position: 29-dim states, 8-dim actions
        obs_shape, action_dim, skill_dim = (29,), 8, config.agent.dads.skill_dim
    else:
        obs_shape, action_dim, skill_dim = ((3, 64, 64) if args.obs == "pixels" else (STATE_DIM,)), ACTION_DIM, 0
    agent = make_agent(config.algo, obs_shape, action_dim, config.agent, seed=0, device=args.device, profile=True)
    params = sum(p.numel() for p in agent.parameters())
    rb = config.replay
    print(f"learner benchmark: {config.algo}, {args.obs}, {args.preset} sizes, batch {rb.batch_size}x{rb.batch_length}, "
          f"{params / 1e6:.1f}M parameters, device {agent.device}, {torch.get_num_threads()} CPU threads", flush=True)
    if agent.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    rng = np.random.default_rng(0)
    n = max(args.updates, 1)
    results = {"obs": args.obs, "preset": args.preset, "device": str(agent.device),
               "batch": [rb.batch_size, rb.batch_length], "parameters": params}
    def batch(reward_scale: float = 0.0) -> dict[str, np.ndarray]:
        return random_batch(rng, obs_shape, rb.batch_size, rb.batch_length, reward_scale, action_dim, skill_dim)

    pre = [batch() for _ in range(min(n, 2))]
    results["pretrain"] = _measure(agent, [pre[i % len(pre)] for i in range(n)], args.warmup, "pretrain")
    if dads:  # DADS trains q on every `dynamics_every`-th update: time as many as one cycle holds
        args.skip_finetune = True
    if args.offline and not dads:
        agent.start_offline()
        results["offline"] = _measure(agent, [pre[i % len(pre)] for i in range(n)], args.warmup, "offline")
        agent.exploration = True
    if not args.skip_finetune:
        agent.finetune_mode()
        ft = [batch(reward_scale=1.0) for _ in range(min(n, 2))]
        results["finetune"] = _measure(agent, [ft[i % len(ft)] for i in range(n)], args.warmup, "finetune")
    results["peak_rss_mb"] = _peak_rss_mb()
    if agent.device.type == "cuda":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

    if as_json:
        print(json.dumps(results, indent=2))
        return 0
    for kind in ("pretrain", "offline", "finetune"):
        if kind not in results:
            continue
        r = results[kind]
        parts = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in r.items() if k != "total_ms")
        print(f"{kind}: {r['total_ms']:.0f} ms/update ({parts})")
    print(f"peak memory: {results['peak_rss_mb']:.0f} MB RSS"
          + (f", {results['peak_cuda_mb']:.0f} MB CUDA" if "peak_cuda_mb" in results else ""))
    return 0


# ---------------------------------------------------------------------------- several learner ranks


def compare_learners(args: argparse.Namespace, config, as_json: bool) -> int:
    """One process, then `args.learners` ranks: pretraining ms/update, updates/s, sequences/s."""
    import os
    import tempfile
    from pathlib import Path

    import torch.multiprocessing as mp

    from choreo.agents.choreographer.agent import resolve_device
    from choreo.learner.dist import free_port

    world = args.learners
    device = resolve_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(f"choreo bench learner: --learners {world} takes one GPU per rank and this machine has "
                         f"{torch.cuda.device_count()}; use --device cpu for CPU ranks")
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    rb = config.replay
    print(f"learner group benchmark: {world} ranks against 1, {args.obs}, {args.preset} sizes, batch "
          f"{rb.batch_size}x{rb.batch_length} per rank, device {device}, {threads} CPU threads per rank", flush=True)
    with tempfile.TemporaryDirectory(prefix="choreo-bench-learners-") as tmp:
        results = {}
        for w in (1, world):
            mp.spawn(_rank_bench, args=(w, f"127.0.0.1:{free_port()}", config, args, threads, tmp),
                     nprocs=w, join=True)
            results[w] = json.loads(Path(tmp, f"w{w}.json").read_text())
    one, many = results[1], results[world]
    for r, w in ((one, 1), (many, world)):
        r["updates_per_s"] = 1000.0 / r["total_ms"]
        r["sequences_per_s"] = r["updates_per_s"] * rb.batch_size * w
    if as_json:
        print(json.dumps({"learners": world, "device": str(device), "threads_per_rank": threads,
                          "runs": {str(k): v for k, v in results.items()}}, indent=2))
        return 0
    print(f"pretrain update, {1} rank: {one['total_ms']:.0f} ms; {world} ranks: {many['total_ms']:.0f} ms "
          f"(of which gradient all-reduce alone ~{many['allreduce_ms']:.1f} ms for "
          f"{many['gradient_mb']:.1f} MB)")
    for key, unit in (("updates_per_s", "updates/s"), ("sequences_per_s", "sequences/s")):
        print(f"  {unit:<12} 1 rank {one[key]:>9.3f}   {world} ranks {many[key]:>9.3f}   x{many[key] / one[key]:.2f}")
    return 0


def _rank_bench(rank: int, world: int, address: str, config, args: argparse.Namespace, threads: int,
                out: str) -> None:
    """One rank of `compare_learners`: times pretraining updates in its group; rank 0 writes them."""
    from pathlib import Path

    from choreo.agents.choreographer.agent import resolve_device
    from choreo.agents.registry import make_agent
    from choreo.learner.dist import join_group, leave_group

    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    collective = join_group(rank, world, address, device)
    try:
        group = {"collective": collective} if collective.active else {}
        agent = make_agent(config.algo, (3, 64, 64) if args.obs == "pixels" else (STATE_DIM,), ACTION_DIM,
                           config.agent, seed=0, device=device, profile=True, **group)
        rng = np.random.default_rng(rank)
        rb = config.replay
        batches = [random_batch(rng, agent.obs_shape, rb.batch_size, rb.batch_length) for _ in range(2)]
        n = max(args.updates, 1)
        timed = _measure(agent, [batches[i % 2] for i in range(n)], args.warmup, f"rank {rank}/{world}")
        grads = [p for p in agent.parameters() if p.requires_grad]
        flat = torch.zeros(sum(p.numel() for p in grads), device=device)
        start = time.perf_counter()
        for _ in range(3):
            collective.mean_([flat])
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed["allreduce_ms"] = (time.perf_counter() - start) / 3 * 1000.0
        timed["gradient_mb"] = flat.numel() * 4 / 2**20
    finally:
        leave_group()
    if rank == 0:
        Path(out, f"w{world}.json").write_text(json.dumps(timed))
