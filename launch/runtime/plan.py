"""A run's plan: what its mode means, resolved once from the config.

Every command is a mode of one runtime; a mode differs from another only in where the data comes
from, what progress counts, which policy the workers run and the agent's phase. This module is
the one place that reads `config.mode` and the dataset keys to decide those; the builder, the run
core and both loops read the plan.

    mode      data                         counts    workers    agent phase
    pretrain  environment workers          frames    explore    pretrain
    pretrain  a dataset (--offline)        updates   none       offline
    pretrain  a dataset, then workers      frames    explore    pretrain
    finetune  environment workers          frames    meta       finetune (snapshot or scratch)
    evaluate  episodes of a snapshot       episodes  meta       none (no learner)
    plan      episodes of a snapshot       episodes  planner    none (no learner)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from choreo.buffer.dataset import is_minari

if TYPE_CHECKING:
    from choreo.launch.runtime.config import Config

Unit = Literal["frames", "updates", "episodes"]


@dataclass(frozen=True)
class RunPlan:
    mode: str
    """The command's mode (`config.mode`): what `--resume` repeats."""
    phase: Literal["pretrain", "offline", "finetune", "none"]
    """What the learner's agent does: pretrain (world model, skills, exploration), train from a
    dataset alone (the same update, no exploration data), fine-tune to a task, or nothing (a
    snapshot used as it is)."""
    workers: bool
    """Environment workers collect into replay."""
    dataset: str
    """A dataset loaded into replay before the run starts: a folder, or `minari:<dataset id>` ("" none)."""
    unit: Unit
    """What progress counts: the x axis of TensorBoard, the progress line, the evaluation cadence and
    the end of the run."""
    total: int
    """The run ends once progress reaches this many units."""
    eval_every: int
    """Units between evaluations, the first at 0 (0: none)."""
    behaviour: Literal["explore", "meta"]
    """The acting policy of the environment workers and of the evaluations: exploration while
    pretraining, the meta-controller choosing skills when adapting (random skills until its reward
    gate opens)."""
    start: Literal["new", "snapshot", "scratch"]
    """Where the agent's weights start: new ones (pretraining), a pretraining snapshot, or random
    ones with the fine-tuning protocol (`--from-scratch`)."""
    seed_frames: int
    """Frames of uniformly random actions before the workers act with the policy (none after a
    dataset: the dataset is the warm-up)."""
    label: str
    """How evaluation records name this run's mode (`choreo report` groups by it): pretrain,
    finetune, scratch, ..."""

    @property
    def snapshots_by_updates(self) -> bool:
        """Snapshots are due at update counts (`learner.snapshot_updates`), not frames."""
        return self.unit == "updates"

    def startup(self, resume: bool, replay_saved: bool) -> StartUp:
        """The start-up decisions of both loops (`--local` and Ray): `resume` continues a run from its
        checkpoint; `replay_saved` says that every replay shard has a checkpoint in the run directory.

        A dataset is read into replay by a new run; a resumed one finds it in its replay checkpoint.
        A replay without workers never changes, so it is saved once, at the first checkpoint
        (rendering pixels from a dataset's physics states may take hours, and is not redone on
        resume); resumed before then, the run reads the dataset again."""
        load_dataset = bool(self.dataset) and (not resume or (not self.workers and not replay_saved))
        return StartUp(
            load_dataset=load_dataset,
            restore_replay=resume and not load_dataset,
            save_replay="every checkpoint" if self.workers else ("once" if load_dataset else "never"),
            skip_random_steps=resume,
            load_checkpoint=resume,
        )


@dataclass(frozen=True)
class StartUp:
    """What a loop does before its first step (`RunPlan.startup`)."""

    load_dataset: bool
    """Read the dataset into the replay shards now."""
    restore_replay: bool
    """Load the replay shards' checkpoints from the run directory."""
    save_replay: Literal["every checkpoint", "once", "never"]
    """When the replay shards are written beside the learner's checkpoint."""
    skip_random_steps: bool
    """The workers' random seed phase happened before an interruption: act with the policy at once."""
    load_checkpoint: bool
    """The learner loads the run's checkpoint (weights, optimisers, counters) instead of starting."""


def resolve_plan(config: Config) -> RunPlan:
    """The plan of `config`'s mode. The config was validated (`load_config`): the combinations that
    cannot run were refused there, naming their keys."""
    lc = config.learner
    dataset = config.dataset.dir
    if dataset and not is_minari(dataset):
        dataset = str(Path(dataset))
    if config.mode in ("evaluate", "plan"):
        return RunPlan(mode=config.mode, phase="none", workers=False, dataset="", unit="episodes",
                       total=config.eval.episodes, eval_every=0, behaviour="meta",
                       start="snapshot" if config.snapshot else "new", seed_frames=0, label=config.mode)
    if config.mode == "finetune":
        start = "scratch" if config.from_scratch else "snapshot"
        return RunPlan(mode="finetune", phase="finetune", workers=True, dataset="", unit="frames",
                       total=lc.total_frames, eval_every=config.eval.every_frames, behaviour="meta", start=start,
                       seed_frames=lc.seed_frames, label="scratch" if config.from_scratch else "finetune")
    if dataset and not config.dataset.collect:  # a dataset alone: no frames, progress in updates
        return RunPlan(mode="pretrain", phase="offline", workers=False, dataset=dataset, unit="updates",
                       total=lc.total_updates, eval_every=config.eval.every_updates, behaviour="explore",
                       start="new", seed_frames=0, label="pretrain")
    return RunPlan(mode="pretrain", phase="pretrain", workers=True, dataset=dataset, unit="frames",
                   total=lc.total_frames, eval_every=config.eval.every_frames, behaviour="explore", start="new",
                   seed_frames=0 if dataset else lc.seed_frames, label="pretrain")
