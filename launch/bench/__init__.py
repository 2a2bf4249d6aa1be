"""`choreo bench <what>`: speed and memory figures (not tests). Each benchmark module is
imported only when asked for."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "envs": "choreo.launch.bench.envs",
    "learner": "choreo.launch.bench.learner",
    "replay": "choreo.launch.bench.replay",
    "actors": "choreo.launch.bench.actors",
    "pretrain": "choreo.launch.bench.pretrain",
    "soak": "choreo.launch.bench.soak",
    "dataset": "choreo.launch.bench.dataset",
    "plan": "choreo.launch.bench.plan",
    "learning": "choreo.launch.bench.learning",
    "device": "choreo.launch.bench.device",
}


def main(what: str, rest: list[str], as_json: bool = False) -> int:
    """Run benchmark `what` with its own command-line options `rest`."""
    if what not in BENCHMARKS:
        raise SystemExit(f"choreo bench: unknown benchmark {what!r}; choose from {', '.join(BENCHMARKS)}")
    # argparse.REMAINDER may hand over a --json given after the benchmark name.
    if "--json" in rest:
        rest = [a for a in rest if a != "--json"]
        as_json = True
    module = importlib.import_module(BENCHMARKS[what])
    return int(module.run(list(rest), as_json=as_json) or 0)
