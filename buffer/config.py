"""Typed settings of the replay service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 2_000_000
    """Steps held in all shards together; the oldest are evicted first."""
    batch_size: int = 50
    """Sequences per training batch."""
    batch_length: int = 50
    """Steps per sequence; a sequence never crosses an episode boundary."""
    chunk_length: int = 50
    """Steps per chunk that an environment worker sends to its shard."""
    samples_per_insert: float = 250.0
    """Target ratio of sampled to inserted steps (0 = no limit: actors and learner run freely)."""
    tolerance: float = 0.1
    """Relative tolerance around samples_per_insert before the learner or the actors wait."""
    min_size: int = 4000
    """Frames (agent steps x action repeat, as learner.seed_frames counts them) collected before
    the learner starts sampling: the reference's 4,000 seed frames, which are 4,000 agent steps at
    action repeat 1 and 2,000 at 2 (pixels, Meta-World). The rate limiter holds back
    ceil(min_size / action repeat) steps."""
    size_refresh_every: int = 10
    """Batches between two refreshes of the shard sizes that the replay client caches for sampling."""


@dataclass(frozen=True)
class DatasetConfig:
    dir: str = ""
    """Offline dataset loaded into replay before training: a folder of per-episode .npz files in
    ExORL's layout (`choreo pretrain --offline DIR`), or `minari:<dataset id>`, a Minari dataset
    installed locally (MINARI_DATASETS_PATH, else ~/.minari/datasets; never downloaded); empty: none."""
    collect: bool = False
    """With a dataset: keep collecting with the exploration policy once it is loaded (offline and
    online data in one replay); false: offline only, no environment workers, the learner trains
    for learner.total_updates updates."""
    verify: bool = True
    """Check every file against the folder's manifest.json (SHA-256) when it has one (Minari
    datasets have none)."""
