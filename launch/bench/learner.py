"""`choreo bench learner`: milliseconds per learner update at the paper's sizes, by part, against
what the machine can do.

Builds the agent of the resolved config (suite and size presets; `algo=dads` for DADS at its
reference sizes, on Ant's shapes), feeds it random batches of the configured shape (50 x 50 at
paper size, 256 pairs for DADS), and prints the mean time per pretraining update and
per fine-tuning update (with --offline also per offline-only pretraining update), broken down by
part, and the peak memory. A figure, not a test.

Then one more update of each kind runs under `torch.utils.flop_counter.FlopCounterMode`, which
counts the floating-point operations of the matrix products and convolutions, forward and
backward (elementwise work, normalisation and the k-NN's selection are not counted: they are
bound by memory traffic); and the machine's own rates are measured in the same process: large
float32 and bfloat16 matrix products, and the bandwidth of a large copy. The table gives each
part's time, operations and achieved rate, and the update's fraction of the matmul rate in the
precision it ran in: the distance to this machine's limit. `--no-flops` skips both.

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


def count_flops(agent, batch: dict) -> dict[str, float]:
    """GFLOP of one update on `batch`, per part of the agent's timer, and `total`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, agent.timer.counting(counter):
        agent.update(batch)
    counted = {name: ops / 1e9 for name, ops in agent.timer.flops().items()}
    counted["total"] = counter.get_total_flops() / 1e9
    return counted


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Seconds per call of `fn`, best of `repeat` after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(device: torch.device, repeat: int = 3, n: int | None = None,
                  elements: int | None = None) -> dict[str, float]:
    """This machine's limits, measured now: GFLOP/s of a large float32 and a large bfloat16
    matrix product (`n` x `n`; TF32 as torch is configured), and GB/s of a large copy of `elements`
    float32 values (read + write)."""
    n = n or (8192 if device.type == "cuda" else 2048)

    def matmul_seconds(dtype: torch.dtype) -> float:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        return _timed(lambda: torch.mm(a, b, out=out), device, repeat)

    rates = {f"matmul_{name}_gflops": 2 * n**3 / matmul_seconds(dtype) / 1e9
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    elements = elements or ((1 << 28) if device.type == "cuda" else (1 << 26))  # 1 GiB / 256 MiB
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    rates["copy_gbs"] = 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), device, repeat) / 1e9
    return rates


PARTS = ("world_model", "exploration", "skill_autoencoder", "skill_actor_critic", "knn_reward",
         "meta_controller", "dynamics", "reward", "sac")
"""Table order; a part missing from an update is left out, one not listed comes last."""


def flop_table(kind: str, timed: dict[str, float], flops: dict[str, float], rates: dict[str, float],
               precision: str) -> list[str]:
    """The lines of one update kind's table: part, ms, GFLOP, GFLOP/s, fraction of the matmul rate."""
    limit = rates[f"matmul_{precision}_gflops"]
    names = [p for p in PARTS if f"{p}_ms" in timed]
    names += sorted(k[:-3] for k in timed if k.endswith("_ms") and k != "total_ms" and k[:-3] not in names)
    lines = [f"{kind + ' update':<28} {'ms':>9} {'GFLOP':>9} {'GFLOP/s':>9} {'of ' + precision + ' matmul':>15}"]

    def row(label: str, ms: float, gflop: float | None) -> str:
        if gflop is None:
            return f"  {label:<26} {ms:>9.0f} {'-':>9} {'-':>9} {'-':>15}"
        rate = gflop / (ms / 1000.0) if ms > 0 else 0.0
        return f"  {label:<26} {ms:>9.0f} {gflop:>9.2f} {rate:>9.1f} {rate / limit:>15.0%}"

    for name in names:
        label = "  of which knn_reward" if name == "knn_reward" else name
        lines.append(row(label, timed[f"{name}_ms"], flops.get(name)))
    lines.append(row("whole update", timed["total_ms"], flops.get("total")))
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="choreo bench learner")
    p.add_argument("--obs", choices=["states", "pixels"], default="states")
    p.add_argument("--preset", default="paper", help="size preset (paper, small or tiny)")
    p.add_argument("--updates", type=int, default=3, help="timed updates of each kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--learners", type=int, default=1,
                   help="also time W learner ranks (processes) training together, against one")
    p.add_argument("--offline", action="store_true",
                   help="also time the update of an offline-only pretraining (no exploration actor-critic)")
    p.add_argument("--no-flops", action="store_true",
                   help="skip counting the operations and measuring the machine's rates")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def bench_learner(config, obs: str, preset: str, updates: int = 3, warmup: int = 1, device: str = "auto",
                  finetune: bool = True, offline: bool = False, count: bool = True) -> dict:
    """Times `updates` updates of each kind (after `warmup` untimed ones) of the agent of `config`
    on random batches, counts one update's operations per part (`count`), measures the machine's
    rates, and returns the figures (see the module docstring). Prints one line per update."""
    from choreo.agents.registry import make_agent

    dads = config.algo == "dads"
    if dads:  # Ant with its x-y position: 29-dim states, 8-dim actions
        obs_shape, action_dim, skill_dim = (29,), 8, config.agent.dads.skill_dim
    else:
        obs_shape, action_dim, skill_dim = ((3, 64, 64) if obs == "pixels" else (STATE_DIM,)), ACTION_DIM, 0
    agent = make_agent(config.algo, obs_shape, action_dim, config.agent, seed=0, device=device, profile=True)
    params = sum(p.numel() for p in agent.parameters())
    rb = config.replay
    print(f"learner benchmark: {config.algo}, {obs}, {preset} sizes, batch {rb.batch_size}x{rb.batch_length}, "
          f"{params / 1e6:.1f}M parameters, device {agent.device}, {torch.get_num_threads()} CPU threads", flush=True)
    if agent.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    rng = np.random.default_rng(0)
    n = max(updates, 1)
    results = {"obs": obs, "preset": preset, "device": str(agent.device),
               "batch": [rb.batch_size, rb.batch_length], "parameters": params}

    def batch(reward_scale: float = 0.0) -> dict[str, np.ndarray]:
        return random_batch(rng, obs_shape, rb.batch_size, rb.batch_length, reward_scale, action_dim, skill_dim)

    flops: dict[str, dict[str, float]] = {}

    def measure(kind: str, batches: list[dict]) -> None:
        results[kind] = _measure(agent, [batches[i % len(batches)] for i in range(n)], warmup, kind)
        if count:  # after the timing, whose peak memory it must not change
            flops[kind] = count_flops(agent, batches[0])

    pre = [batch() for _ in range(min(n, 2))]
    measure("pretrain", pre)
    if offline and not dads:
        agent.start_offline()
        measure("offline", pre)
        agent.exploration = True
    if finetune and not dads:  # DADS trains q on every `dynamics_every`-th update: one kind is a cycle
        agent.finetune_mode()
        measure("finetune", [batch(reward_scale=1.0) for _ in range(min(n, 2))])
    results["peak_rss_mb"] = _peak_rss_mb()
    if agent.device.type == "cuda":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    precision = "bf16" if getattr(agent, "_autocast", None) == torch.bfloat16 else "fp32"
    results["precision"] = precision
    if count:
        results["flops_gflop"] = flops
        results["machine"] = machine_rates(agent.device)
        for kind, counted in flops.items():
            seconds = results[kind]["total_ms"] / 1000.0
            results[kind]["matmul_fraction"] = counted["total"] / seconds / results["machine"][f"matmul_{precision}_gflops"]
    return results


def print_learner(results: dict) -> None:
    """The figures of `bench_learner` as lines: per kind, its parts; then the table against the machine."""
    for kind in ("pretrain", "offline", "finetune"):
        if kind not in results:
            continue
        r = results[kind]
        parts = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in r.items() if k.endswith("_ms") and k != "total_ms")
        print(f"{kind}: {r['total_ms']:.0f} ms/update ({parts})")
    print(f"peak memory: {results['peak_rss_mb']:.0f} MB RSS"
          + (f", {results['peak_cuda_mb']:.0f} MB CUDA" if "peak_cuda_mb" in results else ""))
    if "machine" in results:
        m, precision = results["machine"], results["precision"]
        print(f"this machine now: matmul {m['matmul_fp32_gflops']:.0f} GFLOP/s float32, {m['matmul_bf16_gflops']:.0f} "
              f"GFLOP/s bfloat16; copy {m['copy_gbs']:.1f} GB/s")
        for kind, counted in results["flops_gflop"].items():
            print("\n".join(flop_table(kind, results[kind], counted, m, precision)))
            print(f"{kind}: {counted['total']:.1f} GFLOP in {results[kind]['total_ms'] / 1000:.2f} s, "
                  f"{results[kind]['matmul_fraction']:.0%} of this machine's {precision} matmul rate")


def run(rest: list[str], as_json: bool = False) -> int:
    from choreo.launch.runtime.config import load_config

    args = _parser().parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config([args.obs, args.preset], args.overrides)
    if args.learners > 1:
        return compare_learners(args, config, as_json)
    results = bench_learner(config, args.obs, args.preset, args.updates, args.warmup, args.device,
                            finetune=not args.skip_finetune, offline=args.offline, count=not args.no_flops)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print_learner(results)
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
