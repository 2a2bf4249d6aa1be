"""The learner group's process group: W ranks over `torch.distributed`, NCCL on GPUs and gloo
on CPUs, formed over TCP at rank 0's address. `launch/` places the ranks (Ray actors) and picks
the address; this module only joins and leaves the group, so it runs without Ray (tests spawn
plain processes).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Sequence

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


def rank_device(gpu_ids: Sequence[int | str], visible: str | None) -> torch.device:
    """The CUDA device of a rank that was given the GPUs `gpu_ids` (Ray's ids, the node's) while
    every GPU of its node stays visible to it; `visible`: the process's CUDA_VISIBLE_DEVICES.

    The ranks on a node see the same GPUs and each binds its own, as Ray Train's do: NCCL finds
    the node's NVLink/NVSwitch paths only when the peers' GPUs are visible, and with one GPU per
    process it has been seen to hang on NVSwitch machines. CUDA numbers the visible GPUs from 0
    in the order CUDA_VISIBLE_DEVICES lists them (all of the node's, in order, when unset)."""
    if not gpu_ids:
        raise RuntimeError("this learner rank was given no GPU (learner.gpus_per_learner=0) but trains on CUDA "
                           "(learner.device); give each rank a GPU or set learner.device=cpu")
    own = str(gpu_ids[0])
    if visible is None or not visible.strip():
        return torch.device("cuda", int(own))
    listed = [v.strip() for v in visible.split(",")]
    if own not in listed:
        raise RuntimeError(f"this learner rank's GPU {own} is not among CUDA_VISIBLE_DEVICES={visible}")
    return torch.device("cuda", listed.index(own))


def join_group(rank: int, world: int, address: str, device: torch.device,
               timeout_s: float = GROUP_TIMEOUT_S, backend: str | None = None) -> Collective:
    """Joins the group of `world` ranks at `address` ("host:port", rank 0's) as `rank`, and
    returns its `Collective`; blocks until all ranks joined. One rank alone gets `SOLO` and forms
    no group. The backend follows the device unless given: NCCL for CUDA, gloo otherwise (gloo
    also reduces CUDA tensors, through the host: for ranks that share one GPU, which NCCL refuses)."""
    if world == 1:
        return SOLO
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":  # NCCL binds the rank to the current device
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return TorchCollective()


def leave_group() -> None:
    """Leaves the process group, if this process is in one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
