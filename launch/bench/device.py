"""`choreo bench device --out FIGURES.json`: the learner on an accelerator, in one short run.

Made for a GPU machine lent for minutes at a time: in about 8 minutes on one H100 or H200 it runs
  1. learner: the learner benchmark at paper size, states and pixels, float32 and bfloat16
     autocast, with the table of operations against the machine's measured rates;
  2. compile: the same update eager, with `torch.compile` of the hot modules, and with CUDA
     graphs (compile mode reduce-overhead), side by side: compilation time apart from the
     steady update, since on CUDA the imagination loop is bound by kernel launches;
  3. ranks: two learner ranks sharing the one device for a few updates (NCCL first; NCCL refuses
     two ranks on one GPU on most versions, and then gloo over the same CUDA tensors runs), and
     whether their parameters and buffers are bit-identical afterwards;
  4. pretrain: a pretraining on the embedded Ray, CPU environment workers and the learner on the
     device, for `--pretrain-seconds`: frames/s, updates/s and the replay ratio.
The figures go to one JSON file, rewritten after every step, so that a run cut short keeps what it
measured; a step that fails is recorded with its error and the next one runs.

Without a GPU everything runs on the CPU; `--quick` runs every step at the tiny size in about two
minutes, which is how the tests check the script before any GPU sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from choreo.vocabulary import write_atomically

STEPS = ("learner", "compile", "ranks", "pretrain")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="choreo bench device", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON file of figures (rewritten after every step)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few updates: a check of the script itself")
    p.add_argument("--steps", default=",".join(STEPS), help=f"which steps, comma-separated (default: {','.join(STEPS)})")
    p.add_argument("--updates", type=int, default=None, help="timed updates per measurement (default 3; --quick 1)")
    p.add_argument("--pretrain-seconds", type=float, default=None,
                   help="length of the pretraining step (default 300; --quick 15)")
    p.add_argument("--workers", type=int, default=None,
                   help="environment workers of the pretraining step (default: half the cores, at most 8)")
    p.add_argument("--device", default="auto", help="the learner's device (auto: cuda when there is one)")
    return p


class Figures:
    """The JSON file: every step's figures or error, written atomically after each step."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "steps": {}}
        self.save()

    def save(self) -> None:
        write_atomically(self.path, (json.dumps(self.data, indent=2, default=str) + "\n").encode())

    @contextlib.contextmanager
    def step(self, name: str):
        entry: dict[str, Any] = {"status": "running"}
        self.data["steps"][name] = entry
        start = time.monotonic()
        print(f"\n== {name}", flush=True)
        try:
            yield entry
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one step's failure must not lose the others
            entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            entry["seconds"] = time.monotonic() - start
            self.save()


def _config(obs: str, size: str, overrides: list[str]):
    from choreo.launch.runtime.config import load_config

    return load_config([obs, size], overrides)


def step_learner(entry: dict, size: str, updates: int, device: str) -> None:
    from choreo.launch.bench.learner import bench_learner, print_learner

    for obs in ("states", "pixels"):
        for precision in ("fp32", "bf16"):
            autocast = "off" if precision == "fp32" else "bf16"
            config = _config(obs, size, [f"agent.precision.autocast={autocast}"])
            results = bench_learner(config, obs, size, updates, 1, device, finetune=obs == "states")
            print_learner(results)
            entry[f"{obs}_{precision}"] = results


def step_compile(entry: dict, size: str, updates: int, device: str, on_cuda: bool) -> None:
    """Eager against compiled at the precision the device trains in: the first update (which
    compiles) timed apart from the steady ones."""
    from choreo.launch.bench.learner import bench_learner

    autocast = "bf16" if on_cuda else "off"
    variants = {"eager": ["agent.precision.compile=false"],
                "compiled": ["agent.precision.compile=true"]}
    if on_cuda:
        variants["cuda_graphs"] = ["agent.precision.compile=true", "agent.precision.compile_mode=reduce-overhead"]
    for name, overrides in variants.items():
        config = _config("states", size, [f"agent.precision.autocast={autocast}", *overrides])
        try:
            start = time.perf_counter()
            results = bench_learner(config, "states", size, updates, 1, device, finetune=False, count=False)
            results["wall_s"] = time.perf_counter() - start  # compilation included
            entry[name] = results
            print(f"{name}: {results['pretrain']['total_ms']:.0f} ms/update after the first, "
                  f"{results['wall_s']:.0f} s in all", flush=True)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a figure too
            entry[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
    if "pretrain" in entry["eager"] and "pretrain" in entry.get("compiled", {}):
        entry["speedup"] = entry["eager"]["pretrain"]["total_ms"] / entry["compiled"]["pretrain"]["total_ms"]


def step_ranks(entry: dict, size: str, updates: int, device: torch.device) -> None:
    """Two ranks on the one device train `updates` updates on their own batches; their tensors'
    digests are compared afterwards."""
    import torch.multiprocessing as mp

    from choreo.learner.dist import free_port

    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    config = _config("states", size, [])
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="choreo-bench-ranks-") as tmp:
            try:
                mp.spawn(_rank, args=(2, f"127.0.0.1:{free_port()}", backend, config, str(device), updates, tmp),
                         nprocs=2, join=True)
            except Exception as e:  # noqa: BLE001 - recorded; the next backend is tried
                entry[backend] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
                print(f"{backend}: failed ({type(e).__name__})", flush=True)
                continue
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
        names = ranks[0]["names"]
        differ = [n for n, a, b in zip(names, ranks[0]["digests"], ranks[1]["digests"]) if a != b]
        entry[backend] = {"ms_per_update": [r["ms_per_update"] for r in ranks], "tensors": len(names),
                          "identical": not differ, "first_differing": differ[0] if differ else None}
        print(f"{backend}: {updates} updates at {ranks[0]['ms_per_update']:.0f} ms; {len(names)} tensors "
              + ("bit-identical on both ranks" if not differ else f"DIFFER, first {differ[0]}"), flush=True)
        entry["backend"] = backend
        return
    raise RuntimeError(f"no backend could run two ranks on {device}: " + "; ".join(backends))


def _rank(rank: int, world: int, address: str, backend: str, config, device: str, updates: int, out: str) -> None:
    import numpy as np

    from choreo.agents.registry import make_agent
    from choreo.launch.bench.learner import ACTION_DIM, STATE_DIM
    from choreo.launch.runtime.build import random_batch
    from choreo.learner.dist import join_group, leave_group
    from choreo.learner.learner import tensor_digests

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dev = torch.device(device)
    collective = join_group(rank, world, address, dev, backend=backend)
    try:
        agent = make_agent(config.algo, (STATE_DIM,), ACTION_DIM, config.agent, seed=0, device=dev,
                           collective=collective)
        rb = config.replay
        batch = random_batch(np.random.default_rng(rank), (STATE_DIM,), rb.batch_size, rb.batch_length)
        agent.update(batch)  # the first update builds the optimizers' state: not timed
        start = time.perf_counter()
        for _ in range(updates):
            agent.update(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / updates * 1000.0
        names, digests = tensor_digests(agent)
    finally:
        leave_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"names": names, "digests": digests, "ms_per_update": ms}))


def step_pretrain(entry: dict, size: str, seconds: float, workers: int, device: str) -> None:
    from choreo.launch.bench.pretrain import run_once

    config = _config("states", size, [f"num_actors={workers}", f"learner.device={device}",
                                      "learner.total_frames=10000000"])
    figures = run_once(config, None, seconds)
    entry.update(figures)
    print(f"{figures['frames']:,} frames, {figures['updates']:,} updates in {figures['seconds']:.0f} s: "
          f"{figures['frames_per_s']:,.1f} frames/s, {figures['updates_per_s']:.2f} updates/s, "
          f"replay ratio {figures['ratio']:.2f} (target {figures['target_ratio']:g})", flush=True)


def run(rest: list[str], as_json: bool = False) -> int:
    args = _parser().parse_args(rest)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(f"choreo bench device: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    from choreo.agents.choreographer.agent import resolve_device

    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    size = "tiny" if args.quick else "paper"
    updates = args.updates or (1 if args.quick else 3)
    seconds = args.pretrain_seconds or (15.0 if args.quick else 300.0)
    workers = args.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    header = {"device": str(device), "size": size, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "updates": updates, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if on_cuda:
        header.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      nccl=".".join(map(str, torch.cuda.nccl.version())))
    figures = Figures(Path(args.out), header)
    print(f"device check on {header.get('gpu', str(device))}: steps {', '.join(steps)}; figures in {args.out}",
          flush=True)
    for name in steps:
        with figures.step(name) as entry:
            if name == "learner":
                step_learner(entry, size, updates, str(device))
            elif name == "compile":
                step_compile(entry, size, updates, str(device), on_cuda)
            elif name == "ranks":
                step_ranks(entry, size, max(updates, 2), device)
            else:
                step_pretrain(entry, size, seconds, workers, str(device))
    failed = [n for n, e in figures.data["steps"].items() if e["status"] != "ok"]
    print(f"\nfigures written to {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if as_json:
        print(json.dumps(figures.data, indent=2, default=str))
    return 1 if failed else 0
