"""The learner group's process group: W ranks over `torch.distributed`, NCCL on GPUs and gloo
on CPUs, formed over TCP at rank 0's address. `launch/` places the ranks (Ray actors) and picks
the address; this module only joins and leaves the group, so it runs without Ray (tests spawn
plain processes).
"""

from __future__ import annotations

import datetime
import socket

import torch

from choreo.agents.collective import SOLO, Collective, TorchCollective

GROUP_TIMEOUT_S = 120.0
"""Seconds a collective call waits for the other ranks before it raises (learner.group_timeout_s):
a rank that died or hangs ends every rank's call, and the driver restarts the group from the last
checkpoint."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (rank 0 binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def join_group(rank: int, world: int, address: str, device: torch.device,
               timeout_s: float = GROUP_TIMEOUT_S) -> Collective:
    """Joins the group of `world` ranks at `address` ("host:port", rank 0's) as `rank`, and
    returns its `Collective`; blocks until all ranks joined. One rank alone gets `SOLO` and forms
    no group. The backend follows the device: NCCL for CUDA, gloo otherwise."""
    if world == 1:
        return SOLO
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # a Ray actor sees the GPUs it was given, numbered from 0
        torch.cuda.set_device(device.index or 0)
    torch.distributed.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return TorchCollective()


def leave_group() -> None:
    """Leaves the process group, if this process is in one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
