"""`choreo visualize --snapshot FILE`: every skill of a snapshot as a GIF in the real environment, its
decoded codes and a codebook plot (the drawing is launch/runtime/media.py's)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from choreo.launch.runtime.jobs import run_jobs
from choreo.launch.runtime.media import (DEFAULT_STEPS, ENVS_AT_ONCE, FPS, SkillRollouts, _check_skills, code_grid,
                                         codebook_plot, compose_videos, is_pixel_agent, rollout_skills, write_gif,
                                         write_png)
from choreo.launch.runtime.snapshot import Snapshot


def run_visualize(snapshot: Path, out: Path | None = None, overrides: Sequence[str] = (),
                  steps: int = DEFAULT_STEPS, fps: float = FPS, device: str = "cpu",
                  stream: TextIO | None = None, config_file: str | os.PathLike | None = None) -> Path:
    """Writes into `out` (default: `visualize/` next to the snapshot) a GIF of every skill
    (`skill_XX.gif`), the decoded codes (`codes.png`, pixel agents) and the codebook plot
    (`codebook.png`, over the posterior states of the skill videos); the config is the one saved in
    the snapshot, with a `--config FILE`'s keys and then `key=value` overrides (e.g.
    `task=walker_run`, same domain). Prints progress and a last line naming the folder; returns it."""
    from choreo.launch.runtime.config import ConfigError

    stream = stream or sys.stdout
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; give a folder for the videos")  # before any work
    opened = Snapshot.open(snapshot, overrides, config_file=config_file)
    snapshot, config = opened.path, opened.config
    agent = opened.make_agent(device)
    _check_skills(agent)
    out = snapshot.parent / "visualize" if out is None else Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    k = agent.skills.num_codes
    print(f"{snapshot} ({opened.frames:,} frames): {k} skills on {config.env.task} from {config.env.obs}, "
          f"{steps} steps each", file=stream, flush=True)
    # A job plays one group of skills stepped together; a skill's video does not depend on its group.
    groups = [list(range(start, min(start + ENVS_AT_ONCE, k))) for start in range(0, k, ENVS_AT_ONCE)]
    parts = run_jobs(rollout_skills, [(config, agent, steps, group) for group in groups], local=True,
                     sizes=[len(group) for group in groups], unit="skills", label="choreo visualize", stream=stream)
    rollouts = SkillRollouts([skill for part in parts for skill in part.skills],
                             np.concatenate([part.frames for part in parts]),
                             np.concatenate([part.deter for part in parts]))
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
    """`choreo visualize --snapshot FILE [--out DIR] [--steps N] [--config FILE] [key=value ...]`."""
    from choreo.launch.runtime.config import ConfigError
    from choreo.learner.snapshot import SnapshotError

    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    try:
        run_visualize(Path(args.snapshot), Path(args.out) if args.out else None,
                      list(getattr(args, "overrides", [])), args.steps, config_file=getattr(args, "config", None))
    except SnapshotError as e:
        raise ConfigError(str(e)) from None
    return 0
