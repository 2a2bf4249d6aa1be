"""Helpers of the integration tests that watch processes: a pretraining started as a command,
and the listening sockets of this process's descendants."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def start_endless_pretrain(logdir: Path, run_name: str, new_session: bool = False, overrides: tuple[str, ...] = ()):
    """`choreo pretrain --preset tiny` that would run for days, started as a command, once its
    workers and learner are up. Returns the process, its run directory and the processes it
    started (Ray's). new_session: in a process group of its own, as a terminal or a scheduler
    would start it. overrides: more config overrides (key=value)."""
    import ray  # noqa: F401  (puts the psutil that ray[default] ships on sys.path)
    import psutil

    cmd = [sys.executable, "-m", "choreo.launch.cli", "pretrain", "--preset", "tiny", "--logdir", str(logdir),
           f"run_name={run_name}", "learner.total_frames=100000000", "learner.checkpoint_minutes=1000", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)
    run_dir = logdir / run_name
    deadline = time.monotonic() + 180
    while not (run_dir / "tensorboard").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # workers and learner up and running
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "Ray started no processes"
    return proc, run_dir, children


def listening_sockets(include_self: bool = True) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening inet socket of this process (unless
    include_self is False) and its descendants (Ray's gcs, raylets, agents and workers)."""
    import ray  # noqa: F401
    import psutil

    me = psutil.Process(os.getpid())
    found = []
    for proc in [me, *me.children(recursive=True)] if include_self else me.children(recursive=True):
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
