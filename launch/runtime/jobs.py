"""The job runner: independent jobs (evaluation episodes, plans, videos, sweeps' runs, benchmarks)
run as Ray tasks, on a cluster or an embedded Ray."""

from __future__ import annotations

import os
from typing import Any


def run_tasks(fn: Any, calls: list[tuple], address: str | None, results: list, progress: Any,
              command: str) -> list[dict[str, Any]]:
    """`fn(*call)` for every call as Ray tasks of one CPU each (Ray queues what does not fit and
    retries a task whose process died), on the cluster at `address` or an embedded Ray; results in
    call order. A task that raised ends the command with its error."""
    from choreo.launch.runtime.ray_runtime import connect_ray, shutdown_ray, start_local_ray

    if address:
        connect_ray(address)
    else:
        start_local_ray(num_cpus=os.cpu_count() or 1)
    import ray

    try:
        task = ray.remote(num_cpus=1, max_retries=3)(fn)
        # Large arguments (acting weights) go to the object store once, not once per task.
        shared: dict[int, Any] = {}
        refs = []
        for i, call in enumerate(calls):
            pending_args = [shared.setdefault(id(a), ray.put(a)) if isinstance(a, dict) else a for a in call]
            refs.append((task.remote(*pending_args), i))
        pending = dict(refs)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                results[pending.pop(ref)] = ray.get(ref)
                done += 1
            progress(done)
    except ray.exceptions.RayTaskError as exc:  # a job's environment or policy raised, after its retries
        raise SystemExit(f"{command}: a job failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        shutdown_ray()
    return results
