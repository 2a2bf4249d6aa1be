"""The learner role: prefetches batches in the background, runs the agent's update, publishes
acting weights with a version number, and writes checkpoints and frame-numbered snapshots.

A plain class: `launch/` runs it in the driver process (`--local`) or wraps it as a Ray actor.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from choreo.agents.collective import SOLO, Collective
from choreo.learner.config import LearnerConfig
from choreo.learner.files import CHECKPOINT, SNAPSHOTS, snapshot_name
from choreo.learner.snapshot import atomic_torch_save, save_snapshot

Batch = Mapping[str, np.ndarray]


class NonFiniteLossError(RuntimeError):
    """Too many updates in a row had a NaN or infinite loss or gradient (`max_nonfinite_updates`).
    Every one of them was skipped, and the learner wrote nothing since: the last checkpoint is
    the last good state. The caller should not write a final checkpoint."""


GROUP_CHECK_EVERY = 1000
"""Updates between checks that the ranks of a learner group hold the same parameters and buffers."""

NONFINITE = "learner/nonfinite"
"""The agent's metric: 1.0 when a loss or gradient of the update was not finite (and skipped)."""


class BatchPrefetcher:
    """Draws batches on a background thread so the learner never waits for data that could
    already be there. `sample()` may block (e.g. on the rate limiter) or return None when no
    batch is allowed yet; the thread retries after a short pause."""

    def __init__(self, sample: Callable[[], Batch | None], depth: int = 2) -> None:
        self._sample = sample
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._sample()
            except BaseException as e:  # surfaced to the learner on its next get()
                self._queue.put(e)
                return
            if batch is None:
                time.sleep(0.001)
                continue
            while not self._stop.is_set():
                try:
                    self._queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def get(self, timeout: float | None = None) -> Batch | None:
        """The next batch; None if none arrived within `timeout`. Time spent waiting is counted."""
        start = time.perf_counter()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            item = None
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Learner:
    """Trains `agent` on batches from `sample`; hands acting weights to `publish` every
    `cfg.publish_every` updates. The weight version is the number of updates so far.

    Non-finite updates: an update whose agent reports `learner/nonfinite` > 0 (or, for an agent
    without that metric, a NaN or infinite `*loss` metric) was skipped by the agent. It is
    counted (`skipped_updates`, and `nonfinite_in_a_row` until a finite update resets it), does
    not advance `updates` (the weight version: the weights did not take that step) and publishes
    nothing. After `cfg.max_nonfinite_updates` of them in a row (0: never), `step` raises
    `NonFiniteLossError`; the learner never writes a checkpoint by itself, so the last one is
    left intact. `skipped_updates` counts this process's skips (it is not checkpointed).

    Several learners (`collective`, the agent's group): every rank calls `step` equally often,
    and the ranks train only together: one small agreement per call says whether every rank
    holds a batch (else none trains, and the batches wait) and whether one asked to stop. Only
    rank 0 publishes weights and writes snapshots; the agent keeps the ranks' states equal.
    """

    def __init__(self, agent: Any, sample: Callable[[], Batch | None], publish: Callable[[dict, int], None],
                 cfg: LearnerConfig, run_dir: Path, prefetch: int = 2, run_config: Any = None,
                 snapshots_by_updates: bool = False, collective: Collective = SOLO) -> None:
        self.agent = agent
        self.collective = collective
        self._pending: Batch | None = None  # a rank's batch while another rank has none yet
        self.group_stopped = False  # the last step's agreement: some rank asked to stop
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.publish_fn = publish
        self.updates = 0
        self.batches = 0  # batches trained on or skipped, over the whole run (checkpointed)
        # prefetch=0: draw in the caller's thread (the single-process loop, where replay is not
        # safe to read while the same thread may be writing it).
        self.sample = sample
        self.prefetcher = BatchPrefetcher(sample, depth=prefetch) if prefetch > 0 else None
        self.snapshots_written: set[int] = set()
        # An offline-only run collects no frames: its snapshots are due at update counts.
        self.snapshots_by_updates = snapshots_by_updates
        self.run_config = run_config  # the run's resolved config, stored in snapshots for fine-tuning
        self.skipped_updates = 0
        self.last_batch: Batch | None = None
        self.nonfinite_in_a_row = 0
        self._nonfinite_names: set[str] = set()  # non-finite metrics of the current streak

    @property
    def version(self) -> int:
        return self.updates

    def publish(self) -> None:
        if self.collective.rank == 0:
            self.publish_fn(self.agent.policy_weights(), self.version)

    def step(self, timeout: float | None = None, stop: bool = False) -> dict[str, float] | None:
        """One update on the next prefetched batch; None if no batch came within `timeout`.
        With several learners, None also when another rank had no batch yet, or when any rank's
        `stop` was set (then `group_stopped` is True: every rank leaves its training loop)."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self.prefetcher.get(timeout) if self.prefetcher else self.sample()
        if self.collective.active:
            ready, go = self.collective.agree(batch is not None, not stop)
            self.group_stopped = not go
            if not (ready and go):
                self._pending = batch
                return None
        if batch is None:
            return None
        metrics = self.agent.update(batch)
        self.batches += 1
        self.last_batch = batch  # what the run's pictures are drawn from
        if _nonfinite(metrics):
            self.skipped_updates += 1
            self.nonfinite_in_a_row += 1
            self._nonfinite_names.update(k for k, v in metrics.items() if not _finite(v))
            limit = self.cfg.max_nonfinite_updates
            if 0 < limit <= self.nonfinite_in_a_row:
                raise NonFiniteLossError(self._nonfinite_message())
        else:
            self.nonfinite_in_a_row = 0
            self._nonfinite_names.clear()
            self.updates += 1
            if self.collective.active and self.updates % GROUP_CHECK_EVERY == 0:
                self.check_ranks_agree()
            if self.updates % self.cfg.publish_every == 0:
                self.publish()
        metrics["learner/skipped_updates"] = float(self.skipped_updates)
        return metrics

    def check_ranks_agree(self) -> None:
        """Raises on every rank when the ranks' states differ: an exact digest of each of the agent's
        tensors (every parameter and buffer: the codebook, its EMA sums and counts, code usage, the
        exploration reward's magnitude, the reward gate, the counters) is gathered from every rank
        and compared, and the error names the first tensor that differs. A bug or a hardware fault,
        which the group's restart from the last checkpoint repairs."""
        names, digests = tensor_digests(self.agent)
        device = next((p.device for p in self.agent.parameters()), torch.device("cpu"))  # NCCL gathers on the GPU
        table = self.collective.gather(torch.tensor(digests, dtype=torch.int64, device=device))
        table = table.reshape(self.collective.world, len(names)).cpu()
        differ = (table != table[0]).any(0)
        if bool(differ.any()):
            first = int(differ.nonzero()[0, 0])
            ranks = [r for r in range(1, self.collective.world) if table[r, first] != table[0, first]]
            raise RuntimeError(f"the learner ranks' states drifted apart at update {self.updates}: "
                               f"{int(differ.sum())} of {len(names)} tensors differ, the first '{names[first]}' "
                               f"(on rank {', '.join(map(str, ranks))} against rank 0)")

    def _nonfinite_message(self) -> str:
        names = sorted(self._nonfinite_names)
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        return (f"{self.nonfinite_in_a_row} updates in a row were non-finite "
                f"(NaN or infinite: {shown or 'no metric named'}); their non-finite steps were skipped, "
                f"no weight took them. Stopping at learner.max_nonfinite_updates="
                f"{self.cfg.max_nonfinite_updates} after {self.updates} good updates; "
                f"the last checkpoint was left intact.")

    # ------------------------------------------------------------------ checkpoints

    def state(self, counters: Mapping[str, Any], ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """ranks: with several learners, `rank_state()` of ranks 1.. (rank 0's is in the agent's)."""
        return {"agent": self.agent.state_dict(), "updates": self.updates, "batches": self.batches,
                "snapshots_written": sorted(self.snapshots_written), "counters": dict(counters),
                "learners": self.collective.world, "ranks": list(ranks or [])}

    def rank_state(self) -> dict[str, Any]:
        """What differs between the ranks of a learner group: the agent's random generator."""
        return {"generator": self.agent.generator.get_state()}

    def save_checkpoint(self, counters: Mapping[str, Any], ranks: list[dict[str, Any]] | None = None) -> Path:
        """Learner state and the caller's counters (frames, ...), written atomically."""
        return atomic_torch_save(self.state(counters, ranks), self.run_dir / CHECKPOINT)

    def load_checkpoint(self, path: Path | None = None) -> dict[str, Any]:
        """Restore from a checkpoint (default: the run's); returns the saved counters.

        A rank r > 0 of a group takes the agent's state and then its own generator state, saved
        by a group of the same size. A checkpoint of another group size resumes with the same
        weights and each rank's generator freshly seeded: not the exact continuation (the caller
        warns; `resumed_exactly` says which)."""
        path = Path(path or self.run_dir / CHECKPOINT)
        state = load_torch_file(path)
        self.agent.load_state_dict(state["agent"])
        self.updates = int(state["updates"])
        # Where the replay sampler's stream goes on (`ReplayClient.position`); a checkpoint written
        # before it was saved counts the updates (skipped batches were not counted then).
        self.batches = int(state.get("batches", self.updates))
        self.snapshots_written = set(int(f) for f in state["snapshots_written"])
        saved = int(state.get("learners", 1))
        self.resumed_exactly = saved == self.collective.world
        rank = self.collective.rank
        if rank > 0:
            if self.resumed_exactly:
                self.agent.generator.set_state(state["ranks"][rank - 1]["generator"].cpu())
            else:
                self.agent.generator.manual_seed(self.agent.seed)
        self.checkpoint_learners = saved
        return dict(state["counters"])

    def maybe_snapshot(self, frames: int) -> Path | None:
        """At each configured frame count reached (`snapshot_frames`; `snapshot_<frames>.pt`), or in
        an offline-only run at each update count (`snapshot_updates` and the last update,
        `snapshot_<updates>updates.pt`), the agent's state for fine-tuning. A failed write raises
        WriteFailed once; that snapshot is then given up."""
        if self.snapshots_by_updates:
            schedule, reached, suffix = (*self.cfg.snapshot_updates, self.cfg.total_updates), self.updates, "updates"
        else:
            schedule, reached, suffix = self.cfg.snapshot_frames, frames, ""
        due = [f for f in schedule if reached >= f and f not in self.snapshots_written]
        if not due:
            return None
        if self.collective.rank != 0:  # rank 0 writes the group's snapshot
            self.snapshots_written.update(due)
            return None
        try:
            return save_snapshot(self.run_dir / SNAPSHOTS / snapshot_name(max(due), suffix), self.agent.state_dict(),
                                 self.run_config or {}, frames, self.updates)
        finally:  # a snapshot that could not be written (WriteFailed) is not tried again at every step
            self.snapshots_written.update(due)

    @property
    def wait_seconds(self) -> float:
        return self.prefetcher.wait_seconds if self.prefetcher else 0.0

    def close(self) -> None:
        if self.prefetcher:
            self.prefetcher.close()


def _nonfinite(metrics: Mapping[str, float]) -> bool:
    """Whether an update's metrics say it was non-finite (see `Learner`)."""
    flag = metrics.get(NONFINITE)
    if flag is not None:
        return not flag == 0.0  # NaN counts as non-finite too
    return any(not _finite(v) for k, v in metrics.items() if k.endswith("loss"))


def _finite(value: Any) -> bool:
    return not isinstance(value, (int, float)) or math.isfinite(value)


def load_torch_file(path: Path) -> dict[str, Any]:
    """A checkpoint or snapshot, loaded without running code (weights_only), with errors that name
    the file."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def tensor_digests(module: torch.nn.Module) -> tuple[list[str], list[int]]:
    """The names of `module`'s tensors (every parameter and buffer, in registration order) and an
    exact digest of each: BLAKE2b over its dtype, shape and bytes, cut to a signed 64-bit integer,
    so that one gather compares them all. Equal digests mean bit-identical tensors (but for a
    2^-64 collision); a sum of the values would miss a change that keeps the sum (two entries
    swapped) and every buffer outside the parameters."""
    names: list[str] = []
    digests: list[int] = []
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h = hashlib.blake2b(f"{tensor.dtype}{tuple(tensor.shape)}".encode(), digest_size=8)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
        names.append(name)
        digests.append(int.from_bytes(h.digest(), "little", signed=True))
    return names, digests
