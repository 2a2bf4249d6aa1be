"""`choreo visualize --snapshot FILE`: every skill of a snapshot as a GIF in the real environment, its
decoded codes and a codebook plot (the drawing is launch/runtime/media.py's)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from choreo.launch.runtime.media import (DEFAULT_STEPS, FPS, _check_skills, code_grid, codebook_plot, compose_videos,
                                         is_pixel_agent, rollout_skills, write_gif, write_png)
from choreo.launch.runtime.snapshot import load_agent, snapshot_config


def run_visualize(snapshot: Path, out: Path | None = None, overrides: Sequence[str] = (),
                  steps: int = DEFAULT_STEPS, fps: float = FPS, device: str = "cpu",
                  stream: TextIO | None = None) -> Path:
    """Writes into `out` (default: `visualize/` next to the snapshot) a GIF of every skill
    (`skill_XX.gif`), the decoded codes (`codes.png`, pixel agents) and the codebook plot
    (`codebook.png`, over the posterior states of the skill videos); the config is the one saved in
    the snapshot, with `key=value` overrides (e.g. `env.task=walker_run`, same domain). Prints
    progress and a last line naming the folder; returns it."""
    from choreo.learner.snapshot import load_snapshot

    stream = stream or sys.stdout
    snapshot = Path(snapshot).expanduser()
    data = load_snapshot(snapshot)
    config = snapshot_config(data["config"], overrides)
    out = snapshot.parent / "visualize" if out is None else Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    agent = load_agent(config, snapshot, device=device, data=data)
    _check_skills(agent)
    k = agent.skills.num_codes
    print(f"{snapshot} ({data['frames']:,} frames): {k} skills on {config.env.task} from {config.env.obs}, "
          f"{steps} steps each", file=stream, flush=True)
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        print(f"played {done}/{total} skills ({time.monotonic() - start:,.0f} s)", file=stream, flush=True)

    rollouts = rollout_skills(config, agent, steps, progress=progress)
    width = max(2, len(str(k - 1)))
    for skill, video in zip(rollouts.skills, compose_videos(agent, rollouts)):
        write_gif(out / f"skill_{skill:0{width}d}.gif", video, fps)
    print(f"wrote {len(rollouts.skills)} skill GIFs", file=stream, flush=True)
    if is_pixel_agent(agent):
        write_png(out / "codes.png", code_grid(agent))
    codebook_plot(agent, rollouts.deter.reshape(-1, rollouts.deter.shape[-1]), path=out / "codebook.png")
    print(f"visualizations in {out}", file=stream, flush=True)
    return out


# ----------------------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> int:
    """`choreo visualize --snapshot FILE [--out DIR] [--steps N] [key=value ...]`."""
    from choreo.launch.runtime.config import ConfigError
    from choreo.learner.snapshot import SnapshotError

    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    snapshot = Path(args.snapshot).expanduser()
    if not snapshot.is_file():
        raise ConfigError(f"--snapshot {snapshot}: no such file")
    try:
        run_visualize(snapshot, Path(args.out) if args.out else None, list(getattr(args, "overrides", [])),
                      args.steps)
    except SnapshotError as e:
        raise ConfigError(str(e)) from None
    return 0
