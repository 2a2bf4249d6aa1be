"""The names of what the learner writes into a run directory. Apart from `learner.py`, and without
torch, so that code which only names these files (the run directory type in `launch/`, `choreo
report`) does not pay for importing it."""

from __future__ import annotations

CHECKPOINT = "checkpoint.pt"
"""The learner's last checkpoint: agent, counters, everything a resume restores."""

SNAPSHOTS = "snapshots"
"""The folder of frame-numbered snapshots (`snapshot_name`)."""

SNAPSHOT_PATTERN = "snapshot_*.pt"
"""A glob matching every snapshot file in `SNAPSHOTS`."""


def snapshot_name(count: int, suffix: str = "") -> str:
    """`snapshot_<count><suffix>.pt`: count is frames, or updates with suffix "updates" (offline runs)."""
    return f"snapshot_{int(count)}{suffix}.pt"
