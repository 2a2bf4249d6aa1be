"""`choreo report`: the URL benchmark report over fine-tuning run directories.

Each run directory holds an `eval.jsonl`, one evaluation per line, in the one format of
`launch/runtime/rundir.py` (`EvalRecord`) whichever command wrote it (a fine-tuning run, `choreo plan`):

    {"task": "walker_stand", "seed": 0, "frame": 10000, "updates": 2500, "mean_return": 812.3, "returns": [...],
     "mode": "finetune"}

A run is the evaluations of one (task, seed, mode); its final return is the `mean_return` at its
largest frame. Per task and mode the report gives the final return and the normalised score
(return / URLB expert score) as mean and standard error over seeds. Over all tasks of a mode with
an expert score it gives rliable's aggregates of the (task, seed) normalised scores (Agarwal et
al., 2021), each with a 95% stratified-bootstrap interval (seeds resampled within each task):

- the interquartile mean (IQM) and the mean (higher is better), the optimality gap (lower is better);
- the performance profile: the fraction of runs whose score is above each threshold tau;
- the IQM over frames (the aggregate learning curve), at the frames every run of the mode evaluated;

and between modes (fine-tuned against from scratch, planning against random skills) the
probability of improvement P(X > Y), per task the Mann-Whitney U statistic over n_X n_Y, averaged
over the tasks both ran. They are computed here with numpy and scipy: rliable was archived in
October 2025 and pins arch<8, which breaks on pandas 3.1 (it imports only beside pandas below 3).
matplotlib is needed for `--plot` only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from scipy.stats import trim_mean

from choreo.launch.runtime.rundir import EVAL_MODES, EvalRecordError, RunDir, read_eval_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MATPLOTLIB_PIN = "matplotlib==3.11.2"  # the version pyproject.toml pins

EXPERT_SCORES: dict[str, float] = {
    # URLB expert returns (Laskin et al., 2021): normalised score = return / expert
    "walker_stand": 984.0, "walker_walk": 971.0, "walker_run": 796.0, "walker_flip": 799.0,
    "quadruped_stand": 920.0, "quadruped_walk": 866.0, "quadruped_run": 888.0, "quadruped_jump": 888.0,
    "jaco_reach_top_left": 191.0, "jaco_reach_top_right": 223.0,
    "jaco_reach_bottom_left": 193.0, "jaco_reach_bottom_right": 203.0,
}  # fmt: skip


class ReportError(ValueError):
    """Bad input (a malformed line, a duplicate run, nothing to report); the message names the file."""


# ----------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """The evaluations of one (task, seed, mode), read from one file."""

    task: str
    seed: int
    mode: str
    path: Path
    curve: dict[int, float] = field(default_factory=dict)  # frame -> mean_return
    lines: dict[int, int] = field(default_factory=dict)  # frame -> line number it came from

    @property
    def final_frame(self) -> int:
        return max(self.curve)

    @property
    def final_return(self) -> float:
        return self.curve[self.final_frame]


def find_eval_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """The eval.jsonl files under `paths` (run directories, folders of them at any depth, or the
    files themselves), each once, and one line per path or run directory that was skipped: a path
    that does not exist, or a directory with no eval.jsonl (a folder without any, or a run
    directory, recognised by its config.yaml, without its own)."""
    files: dict[Path, Path] = {}
    skipped: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            skipped.append(f"{path}: does not exist")
        elif path.is_file():
            files.setdefault(path.resolve(), path)
        else:
            found = sorted(path.rglob(RunDir.EVAL))
            if not found:
                skipped.append(f"{path}: no {RunDir.EVAL}")
                continue
            for f in found:
                files.setdefault(f.resolve(), f)
            skipped += [f"{c.parent}: no {RunDir.EVAL}" for c in sorted(path.rglob(RunDir.CONFIG))
                        if not RunDir(c.parent).eval_file.exists()]
    return list(files.values()), skipped


def read_eval_file(path: Path, notes: list[str] | None = None) -> list[Run]:
    """The runs one eval.jsonl holds (usually one). Blank lines are skipped; a frame evaluated twice
    (a resumed run) keeps the later line, with a note."""
    try:
        records = read_eval_records(path)
    except EvalRecordError as e:
        raise ReportError(str(e)) from None
    runs: dict[tuple[str, int, str], Run] = {}
    for number, r in records:
        run = runs.setdefault((r.task, r.seed, r.mode), Run(r.task, r.seed, r.mode, path))
        if r.frame in run.curve and notes is not None:
            notes.append(f"{path}:{number}: frame {r.frame} of {r.task} seed {r.seed} ({r.mode}) evaluated again "
                         f"(first on line {run.lines[r.frame]}); the later value is used")
        run.curve[r.frame], run.lines[r.frame] = r.mean_return, number
    return list(runs.values())


def collect_runs(files: Sequence[Path], notes: list[str] | None = None) -> list[Run]:
    """Every run of `files`; two files holding the same (task, seed, mode) are an error naming both.
    A file without any evaluation is skipped with a note."""
    seen: dict[tuple[str, int, str], Run] = {}
    for path in files:
        runs = read_eval_file(path, notes)
        if not runs and notes is not None:
            notes.append(f"{path}: no evaluations, skipped")
        for run in runs:
            key = (run.task, run.seed, run.mode)
            if key in seen:
                raise ReportError(f"{run.task} seed {run.seed} ({run.mode}) appears in two files: "
                                  f"{seen[key].path} and {path}")
            seen[key] = run
    return list(seen.values())


# ----------------------------------------------------------------------------- statistics


def mean_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sample std with ddof=1 / sqrt(n); 0 for one value)."""
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


def iqm(scores: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50% (rliable: trim_mean(scores, 0.25))."""
    return trim_mean(scores, 0.25, axis=axis)


def optimality_gap(scores: np.ndarray, axis: int = -1, gamma: float = 1.0) -> np.ndarray | float:
    """Mean shortfall below gamma: mean(max(gamma - score, 0)) (rliable, gamma = 1)."""
    return np.mean(np.maximum(gamma - np.asarray(scores, dtype=np.float64), 0.0), axis=axis)


def _task_starts(counts: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)


def task_means(values: np.ndarray, counts: Sequence[int], axis: int = -1) -> np.ndarray:
    """The mean of each task's entries along `axis`, where the entries are grouped by task in
    order, `counts[i]` of task i: [..., N, ...] -> [..., tasks, ...]."""
    values = np.asarray(values, dtype=np.float64)
    shape = [1] * values.ndim
    shape[axis] = len(counts)
    return np.add.reduceat(values, _task_starts(counts), axis=axis) / np.asarray(counts, np.float64).reshape(shape)


def mean_of_task_means(scores: np.ndarray, counts: Sequence[int]) -> np.ndarray | float:
    """rliable's aggregate mean, the mean over tasks of each task's mean over its runs, along the
    last axis of `scores` ([..., N], grouped by task as `counts` says). With as many runs of every
    task it is the mean of all scores; otherwise every task weighs the same."""
    return task_means(scores, counts).mean(axis=-1)


def score_distribution(scores: np.ndarray, taus: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """rliable's performance profile (the run-score distribution, `run_score_deviation`): at each
    threshold tau the fraction of runs whose score is above tau (strictly), [..., N] -> [..., T].
    rliable takes np.mean(scores > tau) over its runs x tasks matrix; here the fraction is taken
    within each task and averaged over tasks, which is the same with as many runs of every task and
    weighs every task the same otherwise."""
    scores = np.asarray(scores, dtype=np.float64)
    taus = np.asarray(taus, dtype=np.float64)
    total = np.zeros((*scores.shape[:-1], len(taus)))
    for start, n in zip(_task_starts(counts), counts, strict=True):  # task by task: [reps, n, T] at most
        total += (scores[..., start:start + n, None] > taus).mean(axis=-2)
    return total / len(counts)


def improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray | float:
    """P(X > Y) on one task: the Mann-Whitney U statistic of X against Y over n_x n_y, i.e. the
    fraction of pairs (x_i, y_j) with x_i > y_j, a tie counting 1/2. Along the last axes, so that
    x [..., n_x] and y [..., n_y] may hold bootstrap replicates in their leading axes."""
    x = np.asarray(x, dtype=np.float64)[..., :, None]
    y = np.asarray(y, dtype=np.float64)[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean(axis=(-2, -1))


def probability_of_improvement(x_by_task: Sequence[np.ndarray], y_by_task: Sequence[np.ndarray]) -> float:
    """rliable's average probability of improvement of X over Y: `improvement` on each task (the
    runs of X against the runs of Y on that task), averaged over tasks."""
    if len(x_by_task) != len(y_by_task) or not len(x_by_task):
        raise ValueError("probability_of_improvement needs the same tasks, at least one, for X and Y")
    return float(np.mean([improvement(x, y) for x, y in zip(x_by_task, y_by_task, strict=True)]))


def stratified_indices(counts: Sequence[int], reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, N] bootstrap indices into N = sum(counts) runs grouped by task (task i's `counts[i]`
    runs in order): within each task its n runs are drawn n times with replacement, so every
    replicate keeps the per-task run counts. Indexing a run's whole learning curve with them
    resamples curves, not points."""
    columns, start = [], 0
    for n in counts:
        columns.append(start + rng.integers(0, n, size=(reps, n)))
        start += n
    return np.concatenate(columns, axis=1)


def stratified_resample(scores_by_task: Sequence[np.ndarray], reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, N] bootstrap replicates of the flattened scores (N = all seeds of all tasks): within
    each task its n seeds are drawn n times with replacement, so every replicate keeps the
    per-task seed counts; columns are grouped by task in the order given."""
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_by_task])
    return flat[stratified_indices([len(s) for s in scores_by_task], reps, rng)]


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile-method interval of bootstrap replicates [reps, ...] -> (low [...], high [...])."""
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    return lo, hi


def bootstrap_ci(
    scores_by_task: Sequence[np.ndarray],
    statistics: Sequence[Callable[[np.ndarray], np.ndarray]],
    reps: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> list[tuple[float, float]]:
    """Percentile-method interval of each statistic (a function of a [reps, N] array along its
    last axis), all computed on the same stratified replicates."""
    samples = stratified_resample(scores_by_task, reps, rng)
    out = []
    for statistic in statistics:
        lo, hi = percentile_interval(statistic(samples), level)
        out.append((float(lo), float(hi)))
    return out


def improvement_ci(
    x_by_task: Sequence[np.ndarray],
    y_by_task: Sequence[np.ndarray],
    reps: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `probability_of_improvement` by rliable's stratified independent
    bootstrap: the runs of X and the runs of Y are each resampled within every task, independently."""
    total = np.zeros(reps)
    for x, y in zip(x_by_task, y_by_task, strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        xs = x[rng.integers(0, len(x), size=(reps, len(x)))]
        ys = y[rng.integers(0, len(y), size=(reps, len(y)))]
        total += improvement(xs, ys)
    lo, hi = percentile_interval(total / len(x_by_task), level)
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- the report


PROFILE_TABLE_TAUS = (0.25, 0.5, 0.75, 1.0)
"""The thresholds of the performance-profile table (the plot draws a fine grid)."""
PROFILE_STEP = 0.025
COMPARISONS = (("finetune", "scratch"), ("plan", "plan_random"))
"""(X, Y) pairs of modes whose probability of improvement P(X > Y) is reported when both ran."""
CURVE_TABLE_ROWS = 11
"""At most this many frames in the IQM-over-frames table (evenly spread, the last included)."""


@dataclass
class TaskSummary:
    """One task under one mode: final return and normalised score over seeds."""

    task: str
    mode: str
    runs: list[Run]
    expert: float | None
    final_return: tuple[float, float]  # mean, s.e.
    normalised: tuple[float, float] | None  # mean, s.e.; None without an expert score

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def normalised_scores(self) -> np.ndarray:
        assert self.expert is not None
        return np.array([r.final_return / self.expert for r in self.runs])

    @property
    def final_returns(self) -> np.ndarray:
        return np.array([r.final_return for r in self.runs])


@dataclass
class Band:
    """A statistic at each point of a grid (thresholds or frames) with its 95% interval."""

    x: np.ndarray  # [P]
    value: np.ndarray  # [P]
    lo: np.ndarray  # [P]
    hi: np.ndarray  # [P]

    def at(self, x: float) -> tuple[float, tuple[float, float]]:
        """The value and interval at grid point `x` (one of `self.x`)."""
        (i,) = np.flatnonzero(self.x == x)
        return float(self.value[i]), (float(self.lo[i]), float(self.hi[i]))


@dataclass
class Aggregate:
    """Over the tasks of one mode that have an expert score."""

    mode: str
    n_tasks: int
    n_runs: int
    iqm: float
    iqm_ci: tuple[float, float]
    gap: float
    gap_ci: tuple[float, float]
    mean: float
    mean_ci: tuple[float, float]
    profile: Band
    """Performance profile: x = thresholds tau, value = fraction of runs with score > tau."""
    curve: Band | None
    """IQM over frames: x = the frames every run of the mode evaluated (None: no frame is common)."""


@dataclass
class Improvement:
    """P(X > Y): the probability that a run of mode X beats a run of mode Y on the same task,
    averaged over the tasks both ran."""

    x: str
    y: str
    tasks: list[str]
    probability: float
    ci: tuple[float, float]


@dataclass
class Report:
    tasks: list[TaskSummary]
    aggregates: list[Aggregate]
    notes: list[str]
    reps: int
    seed: int
    improvements: list[Improvement] = field(default_factory=list)


def _task_order(task: str) -> tuple[int, str]:
    order = list(EXPERT_SCORES)
    return (order.index(task), "") if task in EXPERT_SCORES else (len(order), task)


def learning_curve(summary: TaskSummary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """frames, mean and s.e. over the seeds evaluated at each frame, normalised when the task has
    an expert score (raw returns otherwise)."""
    scale = summary.expert or 1.0
    frames = sorted({f for r in summary.runs for f in r.curve})
    stats = [mean_se([r.curve[f] / scale for r in summary.runs if f in r.curve]) for f in frames]
    mean, se = (np.array(v) for v in zip(*stats, strict=True))
    return np.array(frames), mean, se


def profile_taus(scores: np.ndarray) -> np.ndarray:
    """The thresholds of the performance profiles: 0 to the largest score (at least 1.25) in steps
    of PROFILE_STEP, and the table's thresholds exactly (so that a score equal to one is never
    compared against its rounded neighbour)."""
    top = max(1.25, float(np.max(scores)) + PROFILE_STEP)
    grid = np.arange(0.0, top + PROFILE_STEP / 2, PROFILE_STEP)
    return np.unique(np.concatenate([grid, PROFILE_TABLE_TAUS]))


def _frame_curves(scored: Sequence[TaskSummary]) -> tuple[np.ndarray, np.ndarray, int]:
    """The frames every run of `scored` evaluated [F], the normalised scores there [N, F] (runs in
    the order of `scored`), and how many frames any run evaluated."""
    runs = [(r, t.expert) for t in scored for r in t.runs]
    every = sorted(set.intersection(*(set(r.curve) for r, _ in runs)))
    anywhere = len(set.union(*(set(r.curve) for r, _ in runs)))
    curves = np.array([[r.curve[f] / expert for f in every] for r, expert in runs]).reshape(len(runs), len(every))
    return np.array(every, dtype=np.int64), curves, anywhere


def aggregate(mode: str, scored: Sequence[TaskSummary], taus: np.ndarray, reps: int, rng: np.random.Generator,
              notes: list[str]) -> Aggregate:
    """Every aggregate of one mode with its interval, all from the same stratified replicates of
    runs (a replicate's run keeps its whole learning curve)."""
    by_task = [t.normalised_scores for t in scored]
    counts = [len(s) for s in by_task]
    flat = np.concatenate(by_task)
    index = stratified_indices(counts, reps, rng)  # [reps, N]
    samples = flat[index]

    def interval(values: np.ndarray) -> tuple[float, float]:
        lo, hi = percentile_interval(values)
        return float(lo), float(hi)

    profile = score_distribution(flat, taus, counts)
    profile_lo, profile_hi = percentile_interval(score_distribution(samples, taus, counts))
    frames, curves, anywhere = _frame_curves(scored)  # the runs in the order of `flat`
    curve = None
    if len(frames):
        replicates = np.stack([iqm(curves[:, f][index]) for f in range(len(frames))], axis=1)  # [reps, F]
        curve = Band(frames, np.asarray(iqm(curves, axis=0)), *percentile_interval(replicates))
        if len(frames) < anywhere:
            notes.append(f"{mode}: the IQM over frames uses the {len(frames)} frames that every run evaluated "
                         f"(of {anywhere} evaluated by some run)")
    else:
        notes.append(f"{mode}: no frame was evaluated by every run, so there is no IQM over frames")
    return Aggregate(
        mode, len(scored), len(flat),
        float(iqm(flat)), interval(iqm(samples)),
        float(optimality_gap(flat)), interval(optimality_gap(samples)),
        float(mean_of_task_means(flat, counts)), interval(mean_of_task_means(samples, counts)),
        Band(taus, profile, profile_lo, profile_hi), curve,
    )  # fmt: skip


def compare(x: str, y: str, tasks: Sequence[TaskSummary], reps: int, rng: np.random.Generator) -> Improvement | None:
    """P(x > y) over the tasks both modes ran (final returns: a comparison of ranks within a task
    needs no normalisation, so tasks without an expert score count too); None if they share none."""
    runs = {(t.task, t.mode): t for t in tasks}
    shared = sorted({t.task for t in tasks if t.mode == x and (t.task, y) in runs}, key=_task_order)
    if not shared:
        return None
    xs = [runs[task, x].final_returns for task in shared]
    ys = [runs[task, y].final_returns for task in shared]
    return Improvement(x, y, shared, probability_of_improvement(xs, ys), improvement_ci(xs, ys, reps, rng))


def summarise(runs: Sequence[Run], reps: int = 2000, seed: int = 0, notes: list[str] | None = None) -> Report:
    """Per-task tables, per-mode aggregates and the probability of improvement between modes, with
    stratified-bootstrap intervals. The bootstrap of each mode (and of each comparison) draws from
    a generator seeded by (seed, mode), so the intervals are reproducible and a mode's do not
    change when another mode is added."""
    if reps < 1:
        raise ReportError(f"--reps must be at least 1, got {reps}")
    notes = list(notes or [])
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.mode), []).append(run)
    tasks = []
    for task, mode in sorted(groups, key=lambda k: (_task_order(k[0]), EVAL_MODES.index(k[1]))):
        members = sorted(groups[task, mode], key=lambda r: r.seed)
        expert = EXPERT_SCORES.get(task)
        finals = [r.final_return for r in members]
        normalised = mean_se([f / expert for f in finals]) if expert else None
        tasks.append(TaskSummary(task, mode, members, expert, mean_se(finals), normalised))
        ends = sorted({r.final_frame for r in members})
        if len(ends) > 1:
            notes.append(f"{task} ({mode}): seeds end at different frames ({', '.join(map(str, ends))}); "
                         "each seed's last evaluation is its final return")
    raw = sorted({t.task for t in tasks if t.expert is None}, key=_task_order)
    if raw:
        notes.append(f"no URLB expert score for {', '.join(raw)}: shown as raw returns and left out of the aggregates")
    scored_of = {mode: [t for t in tasks if t.mode == mode and t.expert is not None] for mode in EVAL_MODES}
    scored_of = {mode: scored for mode, scored in scored_of.items() if scored}
    taus = profile_taus(np.concatenate([t.normalised_scores for s in scored_of.values() for t in s])) \
        if scored_of else np.array(PROFILE_TABLE_TAUS)
    aggregates = []
    for mode, scored in scored_of.items():
        rng = np.random.default_rng([seed, EVAL_MODES.index(mode)])
        aggregates.append(aggregate(mode, scored, taus, reps, rng, notes))
        single = [t.task for t in scored if t.n == 1]
        if single:
            notes.append(f"{mode}: one seed only for {', '.join(single)} (s.e. 0; the bootstrap cannot resample it)")
        if len({t.n for t in scored}) > 1:
            notes.append(f"{mode}: the tasks have different numbers of seeds; the mean and the performance profile "
                         "weigh every task the same, the IQM and the optimality gap every run")
    task_sets = {a.mode: {t.task for t in scored_of[a.mode]} for a in aggregates}
    if len({frozenset(s) for s in task_sets.values()}) > 1:
        notes.append("the modes cover different tasks, so their aggregates are over different task sets")
    improvements = []
    for i, (x, y) in enumerate(COMPARISONS):
        found = compare(x, y, tasks, reps, np.random.default_rng([seed, len(EVAL_MODES) + i]))
        if found is not None:
            improvements.append(found)
    return Report(tasks, aggregates, notes, reps, seed, improvements)


# ----------------------------------------------------------------------------- tables


def _pm(mean_se_: tuple[float, float] | None, digits: int) -> str:
    if mean_se_ is None:
        return "-"
    return f"{mean_se_[0]:.{digits}f} ± {mean_se_[1]:.{digits}f}"


def _ci(point: float, ci: tuple[float, float]) -> str:
    return f"{point:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _spread(n: int, k: int) -> list[int]:
    """At most k indices of 0..n-1, evenly spread, the first and the last included."""
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, k))})


def tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table, shared by the text and Markdown renderings."""
    out = [("Final performance per task (mean ± s.e. over seeds)",
            ["task", "mode", "seeds", "final frame", "return", "expert", "normalised"],
            [[t.task, t.mode, str(t.n), str(max(r.final_frame for r in t.runs)), _pm(t.final_return, 1),
              f"{t.expert:g}" if t.expert else "-", _pm(t.normalised, 3)] for t in report.tasks])]
    ci = f"95% stratified-bootstrap CI, {report.reps} replicates, seed {report.seed}"
    if report.aggregates:
        out.append((f"Aggregates of the normalised score over tasks with an expert score ({ci}; IQM and mean: "
                    f"higher is better, optimality gap: lower is better)",
                    ["mode", "tasks", "runs", "IQM", "mean", "optimality gap"],
                    [[a.mode, str(a.n_tasks), str(a.n_runs), _ci(a.iqm, a.iqm_ci), _ci(a.mean, a.mean_ci),
                      _ci(a.gap, a.gap_ci)] for a in report.aggregates]))
    if report.improvements:
        out.append((f"Probability of improvement: P(X > Y) that a run of X beats a run of Y on the same task, "
                    f"averaged over the tasks both ran ({ci})",
                    ["comparison", "tasks", "P(X > Y)"],
                    [[f"{i.x} > {i.y}", str(len(i.tasks)), _ci(i.probability, i.ci)] for i in report.improvements]))
    if report.aggregates:
        out.append((f"Performance profile: fraction of runs with a normalised score above tau ({ci})",
                    ["mode", *(f"tau {tau:g}" for tau in PROFILE_TABLE_TAUS)],
                    [[a.mode, *(_ci(*a.profile.at(tau)) for tau in PROFILE_TABLE_TAUS)] for a in report.aggregates]))
    curves = [a for a in report.aggregates if a.curve is not None]
    if curves:
        frames = sorted({int(f) for a in curves for f in a.curve.x})
        shown = [frames[i] for i in _spread(len(frames), CURVE_TABLE_ROWS)]
        more = f"; {len(shown)} of {len(frames)} frames shown" if len(shown) < len(frames) else ""
        out.append((f"IQM of the normalised score over frames, at the frames every run of a mode evaluated "
                    f"({ci}{more})",
                    ["frame", *(a.mode for a in curves)],
                    [[str(f), *(_ci(*a.curve.at(f)) if f in a.curve.x else "-" for a in curves)] for f in shown]))
    return out


_TEXT_COLUMNS = {"task", "mode", "comparison"}  # left-aligned; numbers are right-aligned


def format_text(report: Report) -> str:
    lines = []
    for title, header, rows in tables(report):
        widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if h in _TEXT_COLUMNS else c.rjust(w)
                             for c, w, h in zip(cells, widths, header, strict=True)).rstrip()

        lines += [title, fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows] + [""]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def format_markdown(report: Report) -> str:
    lines = ["# URLB report", ""]
    for title, header, rows in tables(report):
        align = ["---" if h in _TEXT_COLUMNS else "---:" for h in header]
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(f"--plot needs matplotlib, which is not installed: pip install '{MATPLOTLIB_PIN}'") from None


def _xerr(value: float, lo: float, hi: float) -> list[list[float]]:
    # a percentile interval need not contain its point estimate (an IQM can fall outside it), and
    # matplotlib refuses negative error bars
    return [[max(value - lo, 0.0)], [max(hi - value, 0.0)]]


INTERVAL_PANELS = (
    # title, Aggregate attributes of the point and the interval
    ("IQM (higher is better)", "iqm", "iqm_ci"),
    ("mean (higher is better)", "mean", "mean_ci"),
    ("optimality gap (lower is better)", "gap", "gap_ci"),
)


def plot(report: Report) -> Figure:
    """Learning curves (normalised score against frames, mean and s.e. band over seeds; one panel per
    domain, one line per task and mode; raw returns in a panel of their own for tasks without an
    expert score), then one panel per aggregate with each mode's interval (IQM, mean and optimality
    gap each on an axis of its own: the gap is better lower), the probability of improvement, the
    performance profiles and the IQM over frames, each with its 95% band. A bare Figure on the Agg
    canvas: no pyplot, never a display."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[tuple[str, bool], list[TaskSummary]] = {}
    for t in sorted(report.tasks, key=lambda t: (_task_order(t.task), EVAL_MODES.index(t.mode))):
        panels.setdefault((t.task.split("_", 1)[0], t.expert is not None), []).append(t)
    curves = [a for a in report.aggregates if a.curve is not None]
    n_aggregate = (len(INTERVAL_PANELS) + 1) * bool(report.aggregates) + bool(report.improvements) + bool(curves)
    n = len(panels) + n_aggregate
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(5.0 * cols, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    styles = {"finetune": "-", "scratch": "--"}  # any other mode: dotted
    for ax, ((domain, normalised), summaries) in zip(axes, panels.items(), strict=False):
        colours = {}
        for t in summaries:
            colour = colours.setdefault(t.task, f"C{len(colours) % 10}")
            frames, mean, se = learning_curve(t)
            ax.plot(frames, mean, styles.get(t.mode, ":"), color=colour, marker="o" if len(frames) == 1 else None,
                    label=f"{t.task} ({t.mode})")
            ax.fill_between(frames, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(domain if normalised else f"{domain} (no expert score)")
        ax.set_xlabel("frames")
        ax.set_ylabel("normalised score" if normalised else "return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    rest = iter(axes[len(panels):n])
    colour = {a.mode: f"C{i % 10}" for i, a in enumerate(report.aggregates)}
    if report.aggregates:
        for title, point, ci in INTERVAL_PANELS:
            ax = next(rest)
            for y, a in enumerate(report.aggregates):
                value, (lo, hi) = getattr(a, point), getattr(a, ci)
                ax.errorbar([value], [y], xerr=_xerr(value, lo, hi), fmt="o", color=colour[a.mode], capsize=4)
            ax.set_yticks(range(len(report.aggregates)), [a.mode for a in report.aggregates])
            ax.set_ylim(len(report.aggregates) - 0.5, -0.5)  # the first mode on top
            ax.set_xlabel("normalised score (95% CI)")
            ax.set_title(title)
            ax.grid(axis="x", alpha=0.3)
    if report.improvements:
        ax = next(rest)
        for y, i in enumerate(report.improvements):
            ax.errorbar([i.probability], [y], xerr=_xerr(i.probability, *i.ci), fmt="o",
                        color=colour.get(i.x, "C0"), capsize=4)
        ax.axvline(0.5, color="grey", linewidth=1, linestyle="--")  # no better than a coin
        ax.set_yticks(range(len(report.improvements)), [f"P({i.x} > {i.y})" for i in report.improvements])
        ax.set_ylim(len(report.improvements) - 0.5, -0.5)
        ax.set_xlim(-0.02, 1.02)  # a point at 0 or 1 stays whole
        ax.set_xlabel("probability of improvement (95% CI)")
        ax.set_title("probability of improvement")
        ax.grid(axis="x", alpha=0.3)
    if report.aggregates:
        ax = next(rest)
        for a in report.aggregates:
            ax.plot(a.profile.x, a.profile.value, color=colour[a.mode], label=a.mode)
            ax.fill_between(a.profile.x, a.profile.lo, a.profile.hi, color=colour[a.mode], alpha=0.2, linewidth=0)
        ax.set_xlabel("normalised score τ")
        ax.set_ylabel("fraction of runs with score > τ")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("performance profile")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    if curves:
        ax = next(rest)
        for a in curves:
            ax.plot(a.curve.x, a.curve.value, color=colour[a.mode], marker="o" if len(a.curve.x) == 1 else None,
                    label=a.mode)
            ax.fill_between(a.curve.x, a.curve.lo, a.curve.hi, color=colour[a.mode], alpha=0.2, linewidth=0)
        ax.set_xlabel("frames")
        ax.set_ylabel("IQM normalised score")
        ax.set_title("IQM over frames")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return fig


# ----------------------------------------------------------------------------- command


def run(
    paths: Sequence[str],
    plot_path: str | None = None,
    markdown_path: str | None = None,
    reps: int = 2000,
    seed: int = 0,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """`choreo report`: print the tables, optionally write Markdown and a PNG. Bad input is one
    line on stderr and exit code 2, never a traceback."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        for option, target in (("--plot", plot_path), ("--markdown", markdown_path)):
            if target and Path(target).is_dir():  # refused before the bootstrap, not after it
                raise ReportError(f"{option} {target}: is a directory, not a file; give a file name such as "
                                  f"{Path(target) / ('curves.png' if option == '--plot' else 'report.md')}")
        if plot_path:
            _require_matplotlib()
        files, skipped = find_eval_files(paths)
        for line in skipped:
            print(f"choreo report: skipped {line}", file=err)
        notes: list[str] = []
        runs = collect_runs(files, notes)
        if not runs:
            raise ReportError("no evaluations found in " + ", ".join(map(str, paths)))
        report = summarise(runs, reps=reps, seed=seed, notes=notes)
        out.write(format_text(report))
        if markdown_path:
            _write(Path(markdown_path), format_markdown(report))
            print(f"wrote {markdown_path}", file=out)
        if plot_path:
            target = Path(plot_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            plot(report).savefig(target, dpi=120)
            print(f"wrote {plot_path}", file=out)
    except ReportError as e:
        print(f"choreo report: error: {e}", file=err)
        return 2
    except OSError as e:  # an output that cannot be written
        print(f"choreo report: error: {e}", file=err)
        return 2
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
