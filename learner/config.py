"""Typed settings of the learner process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LearnerConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner trains: auto picks CUDA when there is one."""
    total_frames: int = 2_000_000
    """Environment frames (agent steps x action repeat) of the whole run."""
    seed_frames: int = 4000
    """Frames of uniformly random actions in [-1, 1] before the policy acts."""
    publish_every: int = 10
    """Updates between publications of the acting weights."""
    checkpoint_minutes: float = 10.0
    """Minutes between checkpoints of the learner state and the replay."""
    snapshot_frames: tuple[int, ...] = field(default=(100_000, 500_000, 1_000_000, 2_000_000))
    """Frame counts at which a snapshot for fine-tuning is written."""
    total_updates: int = 200_000
    """Updates of an offline-only pretraining (a dataset and no environment workers), the
    reference's; online runs end by total_frames instead."""
    snapshot_updates: tuple[int, ...] = field(default=(10_000, 50_000, 100_000, 200_000))
    """Update counts at which an offline-only pretraining writes a snapshot (and at its last update)."""
    threads: int = 0
    """Torch CPU threads of the learner process (0: all cores of its machine; a rank of a learner
    group: its share of its node's cores)."""
    log_every: int = 100
    """Updates between metric writes to TensorBoard."""
    num_learners: int = 1
    """Learner ranks that train the one agent together, data-parallel (one Ray actor each, over
    torch.distributed: NCCL on GPUs, gloo on CPUs). 1 is the single learner."""
    gpus_per_learner: float = 1.0
    """GPUs each learner rank asks Ray for when the cluster has GPUs (0 trains on CPUs)."""
    scaling: Literal["weak", "strong"] = "weak"
    """With several learners: `weak` gives each rank a batch of replay.batch_size (the global batch
    grows with num_learners, and every learning rate is multiplied by sqrt(num_learners));
    `strong` splits replay.batch_size over the ranks (same global batch, same learning rates; it
    needs agent.choreographer.knn_pool=global, so that the k-NN reward is the single learner's)."""
    group_timeout_s: float = 120.0
    """With several learners: seconds a rank waits in a collective for the others before its call
    fails; the whole group then restarts from the last checkpoint (a rank that hangs)."""
    max_nonfinite_updates: int = 10
    """Non-finite updates in a row (a NaN or infinite loss or gradient: the update is skipped)
    after which the run stops with NonFiniteLossError, its last checkpoint intact; 0: never."""
