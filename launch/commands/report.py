"""`choreo report`: the URL benchmark report over fine-tuning run directories.

Each run directory holds an `eval.jsonl`, one evaluation per line, in the one format of
`launch/runtime/rundir.py` (`EvalRecord`) whichever command wrote it (a fine-tuning run, `choreo plan`):

    {"task": "walker_stand", "seed": 0, "frame": 10000, "updates": 2500, "mean_return": 812.3, "returns": [...],
     "mode": "finetune"}

A run is the evaluations of one (task, seed, mode); its final return is the `mean_return` at its
largest frame. Per task and mode the report gives the final return and the normalised score
(return / URLB expert score) as mean and standard error over seeds; over all tasks of a mode, the
interquartile mean (IQM) and the optimality gap of the (task, seed) normalised scores, each with a
95% stratified-bootstrap confidence interval (rliable's definitions, computed here with numpy and
scipy: rliable does not import next to numpy 2). matplotlib is needed for `--plot` only.
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


def stratified_resample(scores_by_task: Sequence[np.ndarray], reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, N] bootstrap replicates of the flattened scores (N = all seeds of all tasks): within
    each task its n seeds are drawn n times with replacement, so every replicate keeps the
    per-task seed counts; columns are grouped by task in the order given."""
    columns = []
    for scores in scores_by_task:
        scores = np.asarray(scores, dtype=np.float64)
        columns.append(scores[rng.integers(0, len(scores), size=(reps, len(scores)))])
    return np.concatenate(columns, axis=1)


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
    tail = 100.0 * (1.0 - level) / 2.0
    out = []
    for statistic in statistics:
        lo, hi = np.percentile(statistic(samples), [tail, 100.0 - tail])
        out.append((float(lo), float(hi)))
    return out


# ----------------------------------------------------------------------------- the report


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


@dataclass
class Report:
    tasks: list[TaskSummary]
    aggregates: list[Aggregate]
    notes: list[str]
    reps: int
    seed: int


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


def summarise(runs: Sequence[Run], reps: int = 2000, seed: int = 0, notes: list[str] | None = None) -> Report:
    """Per-task tables and per-mode aggregates with stratified-bootstrap intervals. The bootstrap of
    each mode draws from a generator seeded by (seed, mode), so the intervals are reproducible and
    a mode's do not change when another mode is added."""
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
    aggregates = []
    for mode in EVAL_MODES:
        scored = [t for t in tasks if t.mode == mode and t.expert is not None]
        if not scored:
            continue
        by_task = [t.normalised_scores for t in scored]
        flat = np.concatenate(by_task)
        rng = np.random.default_rng([seed, EVAL_MODES.index(mode)])
        iqm_ci, gap_ci = bootstrap_ci(by_task, [iqm, optimality_gap], reps, rng)
        aggregates.append(Aggregate(mode, len(scored), len(flat), float(iqm(flat)), iqm_ci,
                                    float(optimality_gap(flat)), gap_ci))
        single = [t.task for t in scored if t.n == 1]
        if single:
            notes.append(f"{mode}: one seed only for {', '.join(single)} (s.e. 0; the bootstrap cannot resample it)")
    task_sets = {a.mode: {t.task for t in tasks if t.mode == a.mode and t.expert is not None} for a in aggregates}
    if len({frozenset(s) for s in task_sets.values()}) > 1:
        notes.append("the modes cover different tasks, so their aggregates are over different task sets")
    return Report(tasks, aggregates, notes, reps, seed)


# ----------------------------------------------------------------------------- tables


def _pm(mean_se_: tuple[float, float] | None, digits: int) -> str:
    if mean_se_ is None:
        return "-"
    return f"{mean_se_[0]:.{digits}f} ± {mean_se_[1]:.{digits}f}"


def _ci(point: float, ci: tuple[float, float]) -> str:
    return f"{point:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table, shared by the text and Markdown renderings."""
    out = [("Final performance per task (mean ± s.e. over seeds)",
            ["task", "mode", "seeds", "final frame", "return", "expert", "normalised"],
            [[t.task, t.mode, str(t.n), str(max(r.final_frame for r in t.runs)), _pm(t.final_return, 1),
              f"{t.expert:g}" if t.expert else "-", _pm(t.normalised, 3)] for t in report.tasks])]
    if report.aggregates:
        out.append((f"Aggregates over tasks with an expert score (95% stratified-bootstrap CI, "
                    f"{report.reps} replicates, seed {report.seed})",
                    ["mode", "tasks", "runs", "IQM", "optimality gap"],
                    [[a.mode, str(a.n_tasks), str(a.n_runs), _ci(a.iqm, a.iqm_ci), _ci(a.gap, a.gap_ci)]
                     for a in report.aggregates]))
    return out


_TEXT_COLUMNS = {"task", "mode"}  # left-aligned; numbers are right-aligned


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


def plot(report: Report) -> Figure:
    """Learning curves (normalised score against frames, mean and s.e. band over seeds; one panel per
    domain, one line per task and mode; raw returns in a panel of their own for tasks without an
    expert score) and a panel of the aggregate IQM and optimality gap with their intervals per
    mode. A bare Figure on the Agg canvas: no pyplot, never a display."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[tuple[str, bool], list[TaskSummary]] = {}
    for t in sorted(report.tasks, key=lambda t: (_task_order(t.task), EVAL_MODES.index(t.mode))):
        panels.setdefault((t.task.split("_", 1)[0], t.expert is not None), []).append(t)
    n = len(panels) + bool(report.aggregates)
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
    if report.aggregates:
        ax = axes[len(panels)]
        labels, y = [], 0
        for name, point, ci in (("IQM", "iqm", "iqm_ci"), ("optimality gap", "gap", "gap_ci")):
            for i, a in enumerate(report.aggregates):
                value, (lo, hi) = getattr(a, point), getattr(a, ci)
                ax.errorbar([value], [y], xerr=[[value - lo], [hi - value]], fmt="o", color=f"C{i}", capsize=4)
                labels.append(f"{name} · {a.mode}")
                y += 1
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("normalised score (95% CI)")
        ax.set_title("aggregates")
        ax.grid(axis="x", alpha=0.3)
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
