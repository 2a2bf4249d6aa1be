"""`choreo report`: reading eval.jsonl files, per-task statistics, rliable's aggregates (IQM, mean,
optimality gap, probability of improvement, performance profiles, IQM over frames) with
stratified-bootstrap intervals, the tables, Markdown and the plot. Hand-made files, no Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from choreo.launch.commands import report as rep
from choreo.launch.cli import main

SQRT3 = math.sqrt(3.0)

# Final returns (at frame 100000) chosen so that the normalised scores are round numbers:
#   walker_stand (expert 984):        492, 738, 984   -> 0.5, 0.75, 1.0
#   quadruped_walk (expert 866):      433, 433, 866   -> 0.5, 0.5,  1.0
#   jaco_reach_top_left (expert 191): 95.5, 191, 286.5 -> 0.5, 1.0, 1.5
# and two scratch seeds of walker_stand: 98.4, 196.8 -> 0.1, 0.2
FINETUNE = {
    "walker_stand": [492.0, 738.0, 984.0],
    "quadruped_walk": [433.0, 433.0, 866.0],
    "jaco_reach_top_left": [95.5, 191.0, 286.5],
}
SCRATCH = {"walker_stand": [98.4, 196.8]}


def write_run(path: Path, task: str, seed: int, final: float, mode: str | None = "finetune") -> Path:
    """A run directory whose eval.jsonl holds frames 0, 100000 and 50000 (the final frame is not on
    the last line) with other values before the final one."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(f"task: {task}\nseed: {seed}\n")
    lines = []
    for frame, value in ((0, 1.0), (100000, final), (50000, final / 2 + 7.0)):
        line = {"task": task, "seed": seed, "frame": frame, "mean_return": value, "returns": [value, value]}
        if mode is not None:
            line["mode"] = mode
        lines.append(json.dumps(line))
    (path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep folder of folders: sweep/<task>/<mode>/seed<k>/eval.jsonl; the fine-tuned runs of
    quadruped_walk omit "mode" (which means finetune)."""
    root = tmp_path / "sweep"
    for task, finals in FINETUNE.items():
        for seed, final in enumerate(finals):
            mode = None if task == "quadruped_walk" else "finetune"
            write_run(root / task / "finetune" / f"seed{seed}", task, seed, final, mode)
    for task, finals in SCRATCH.items():
        for seed, final in enumerate(finals):
            write_run(root / task / "scratch" / f"seed{seed}", task, seed, final, "scratch")
    return root


def load(*paths: Path, reps: int = 2000, seed: int = 0) -> rep.Report:
    files, _ = rep.find_eval_files(paths)
    notes: list[str] = []
    return rep.summarise(rep.collect_runs(files, notes), reps=reps, seed=seed, notes=notes)


def by_key(report: rep.Report) -> dict[tuple[str, str], rep.TaskSummary]:
    return {(t.task, t.mode): t for t in report.tasks}


# ----------------------------------------------------------------------------- statistics


def test_per_task_final_return_and_normalised_score(sweep):
    tasks = by_key(load(sweep))
    assert set(tasks) == {("walker_stand", "finetune"), ("quadruped_walk", "finetune"),
                          ("jaco_reach_top_left", "finetune"), ("walker_stand", "scratch")}

    t = tasks["walker_stand", "finetune"]
    assert t.n == 3 and t.expert == 984.0
    np.testing.assert_allclose(t.normalised_scores, [0.5, 0.75, 1.0])
    np.testing.assert_allclose(t.final_return, (738.0, 246.0 / SQRT3))  # std 246
    np.testing.assert_allclose(t.normalised, (0.75, 0.25 / SQRT3))  # std 0.25

    t = tasks["quadruped_walk", "finetune"]  # lines without "mode" count as finetune
    np.testing.assert_allclose(t.final_return, (1732.0 / 3, 866.0 * math.sqrt(1 / 12) / SQRT3))
    np.testing.assert_allclose(t.normalised, (2 / 3, 1 / 6))  # std sqrt(1/12), s.e. 1/6

    t = tasks["jaco_reach_top_left", "finetune"]
    np.testing.assert_allclose(t.final_return, (191.0, 95.5 / SQRT3))
    np.testing.assert_allclose(t.normalised, (1.0, 0.5 / SQRT3))

    t = tasks["walker_stand", "scratch"]
    assert t.n == 2
    np.testing.assert_allclose(t.normalised, (0.15, 0.05))  # std 0.0707, / sqrt(2)


def test_mean_se_of_one_value_is_zero():
    assert rep.mean_se([3.5]) == (3.5, 0.0)
    np.testing.assert_allclose(rep.mean_se([1.0, 2.0, 3.0, 4.0]), (2.5, math.sqrt(5 / 3) / 2))


def test_iqm_and_optimality_gap_by_hand():
    scores = np.array([0.6, 2.0, 0.1, 0.4, 1.5, 0.3, 0.2, 0.5])
    # sorted: 0.1 0.2 | 0.3 0.4 0.5 0.6 | 1.5 2.0 -> the middle four
    assert rep.iqm(scores) == pytest.approx(0.45)
    # max(1 - s, 0): 0.4 0 0.9 0.6 0 0.7 0.8 0.5 -> 3.9 / 8
    assert rep.optimality_gap(scores) == pytest.approx(3.9 / 8)
    # along the last axis of a [reps, N] array, row by row
    np.testing.assert_allclose(rep.iqm(np.stack([scores, scores + 1.0])), [0.45, 1.45])
    np.testing.assert_allclose(rep.optimality_gap(np.stack([scores, scores + 1.0])), [3.9 / 8, 0.0])


def test_aggregates_point_estimates(sweep):
    report = load(sweep)
    assert [a.mode for a in report.aggregates] == ["finetune", "scratch"]
    a = report.aggregates[0]
    assert (a.n_tasks, a.n_runs) == (3, 9)
    # scores 0.5 0.75 1.0 | 0.5 0.5 1.0 | 0.5 1.0 1.5; trim int(0.25 * 9) = 2 from each end of
    # 0.5 0.5 0.5 0.5 0.75 1.0 1.0 1.0 1.5 -> mean(0.5, 0.5, 0.75, 1.0, 1.0) = 0.75
    assert a.iqm == pytest.approx(0.75)
    # gaps 0.5 0.25 0 0.5 0.5 0 0.5 0 0 -> 2.25 / 9
    assert a.gap == pytest.approx(0.25)
    s = report.aggregates[1]
    assert s.gap == pytest.approx(0.85)  # scratch: 0.9, 0.8


def test_bootstrap_is_reproducible_and_contains_the_point_estimate(tmp_path):
    # distinct scores (the round ones of `sweep` give the same percentiles under many seeds)
    finals = {"walker_walk": [310.0, 455.0, 702.0, 871.0, 530.0],
              "quadruped_run": [120.0, 640.0, 333.0, 910.0, 402.0],
              "jaco_reach_bottom_left": [61.0, 150.0, 212.0, 97.0, 188.0]}
    for task, values in finals.items():
        for seed, final in enumerate(values):
            write_run(tmp_path / task / str(seed), task, seed, final)
    a1, a2 = load(tmp_path, seed=0).aggregates[0], load(tmp_path, seed=0).aggregates[0]
    assert (a1.iqm_ci, a1.gap_ci) == (a2.iqm_ci, a2.gap_ci)
    other = load(tmp_path, seed=1).aggregates[0]
    assert (other.iqm_ci, other.gap_ci) != (a1.iqm_ci, a1.gap_ci)
    for agg in (a1, other):
        assert agg.iqm_ci[0] <= agg.iqm <= agg.iqm_ci[1]
        assert agg.gap_ci[0] <= agg.gap <= agg.gap_ci[1]
        assert agg.iqm_ci[0] < agg.iqm_ci[1] and agg.gap_ci[0] < agg.gap_ci[1]


def test_bootstrap_ci_is_the_percentile_interval():
    # with one task of two distinct values, half the replicates of the mean of one draw are each
    by_task = [np.array([0.0, 1.0])]
    (lo, hi), = rep.bootstrap_ci(by_task, [lambda x: x.mean(axis=-1)], reps=4000, rng=np.random.default_rng(0))
    assert (lo, hi) == (0.0, 1.0)


def test_stratified_resample_keeps_the_seed_count_of_every_task():
    # distinct values per task, so each column can be traced back to its task
    by_task = [np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0]), np.array([100.0, 200.0, 300.0, 400.0])]
    samples = rep.stratified_resample(by_task, reps=500, rng=np.random.default_rng(3))
    assert samples.shape == (500, 9)
    blocks = np.split(samples, [3, 5], axis=1)
    for block, scores in zip(blocks, by_task, strict=True):
        assert block.shape[1] == len(scores)
        assert np.isin(block, scores).all()  # every draw of a task comes from that task
        assert set(np.unique(block)) == set(scores)  # and every seed gets drawn somewhere
    # with replacement: some replicate repeats a seed
    assert any(len(set(row)) < 3 for row in blocks[0])
    # one seed: every replicate is that seed
    np.testing.assert_array_equal(rep.stratified_resample([np.array([0.7])], 5, np.random.default_rng(0)), 0.7)


# ----------------------------------------------------------------------------- rliable's other metrics
#
# Each against rliable's definition (rliable/metrics.py and library.py) on a small example worked
# out by hand. rliable holds scores as a [runs, tasks] matrix; here they are grouped by task.

# Two tasks, three runs each (rliable's matrix, runs x tasks: [[0.2, 0.5], [0.4, 1.0], [0.9, 1.5]]).
TASK_A = np.array([0.2, 0.4, 0.9])
TASK_B = np.array([0.5, 1.0, 1.5])


def test_mean_is_the_mean_of_task_means():
    # rliable's aggregate_mean: np.mean(np.mean(scores, axis=0)) = mean(1.5 / 3, 3.0 / 3) = 0.75
    flat = np.concatenate([TASK_A, TASK_B])
    assert rep.mean_of_task_means(flat, [3, 3]) == pytest.approx(0.75)
    matrix = np.stack([TASK_A, TASK_B], axis=1)
    assert rep.mean_of_task_means(flat, [3, 3]) == pytest.approx(np.mean(np.mean(matrix, axis=0)))
    # replicates along the leading axis, row by row
    np.testing.assert_allclose(rep.mean_of_task_means(np.stack([flat, flat + 1.0]), [3, 3]), [0.75, 1.75])
    # unequal runs: every task weighs the same; task C [0, 1] has mean 0.5, task D [1] mean 1
    # -> (0.5 + 1) / 2 = 0.75 (the mean of the three scores would be 2/3)
    assert rep.mean_of_task_means(np.array([0.0, 1.0, 1.0]), [2, 1]) == pytest.approx(0.75)


def test_performance_profile_is_the_run_score_distribution():
    flat = np.concatenate([TASK_A, TASK_B])
    taus = np.array([0.25, 0.5, 1.0])
    # tau 0.25: A 0.4, 0.9 (2/3), B all (3/3)            -> 5/6
    # tau 0.5:  A 0.9 (1/3), B 1.0, 1.5 (2/3; 0.5 is not above 0.5) -> 1/2
    # tau 1.0:  A none, B 1.5 (1/3)                      -> 1/6
    np.testing.assert_allclose(rep.score_distribution(flat, taus, [3, 3]), [5 / 6, 1 / 2, 1 / 6])
    # rliable's run_score_deviation: np.mean(scores > tau) over the runs x tasks matrix
    matrix = np.stack([TASK_A, TASK_B], axis=1)
    np.testing.assert_allclose(rep.score_distribution(flat, taus, [3, 3]), [np.mean(matrix > t) for t in taus])
    # replicates [reps, N] -> [reps, T]
    assert rep.score_distribution(np.stack([flat, flat]), taus, [3, 3]).shape == (2, 3)
    # unequal runs: C [0, 1] has 1/2 above 0.5, D [1] has 1/1 -> 3/4 (2/3 of all scores)
    np.testing.assert_allclose(rep.score_distribution(np.array([0.0, 1.0, 1.0]), [0.5], [2, 1]), [0.75])


def test_probability_of_improvement_by_hand_and_as_mann_whitney():
    x = [np.array([0.2, 0.4, 0.9]), np.array([0.5, 1.0, 1.5])]
    y = [np.array([0.1, 0.4]), np.array([2.0, 0.5])]
    # task 1, pairs (x, y): (0.2, 0.1) 1, (0.2, 0.4) 0, (0.4, 0.1) 1, (0.4, 0.4) 1/2, (0.9, 0.1) 1,
    #   (0.9, 0.4) 1 -> 4.5 / 6 = 3/4
    # task 2: (0.5, 2) 0, (0.5, 0.5) 1/2, (1, 2) 0, (1, 0.5) 1, (1.5, 2) 0, (1.5, 0.5) 1 -> 2.5 / 6 = 5/12
    # average over the tasks: (9/12 + 5/12) / 2 = 7/12
    assert rep.improvement(x[0], y[0]) == pytest.approx(0.75)
    assert rep.improvement(x[1], y[1]) == pytest.approx(5 / 12)
    assert rep.probability_of_improvement(x, y) == pytest.approx(7 / 12)
    # rliable: scipy's Mann-Whitney U of X against Y (alternative "greater") / (n_x n_y), per task
    from scipy.stats import mannwhitneyu

    per_task = [mannwhitneyu(a, b, alternative="greater").statistic / (len(a) * len(b)) for a, b in zip(x, y)]
    assert rep.probability_of_improvement(x, y) == pytest.approx(np.mean(per_task))
    # the same runs on both sides: 1/2 (rliable's special case comes out of the ties)
    assert rep.probability_of_improvement([TASK_A], [TASK_A]) == pytest.approx(0.5)
    assert rep.probability_of_improvement(y, x) == pytest.approx(1 - 7 / 12)
    with pytest.raises(ValueError, match="same tasks"):
        rep.probability_of_improvement(x, y[:1])


def test_probability_of_improvement_interval():
    rng = np.random.default_rng(0)
    # X beats Y on every pair of every task: every replicate gives 1
    assert rep.improvement_ci([np.array([2.0, 3.0])], [np.array([0.0, 1.0])], 500, rng) == (1.0, 1.0)
    x = [np.array([0.2, 0.4, 0.9]), np.array([0.5, 1.0, 1.5])]
    y = [np.array([0.1, 0.4]), np.array([2.0, 0.5])]
    lo, hi = rep.improvement_ci(x, y, 2000, np.random.default_rng(1))
    assert 0.0 <= lo < 7 / 12 < hi <= 1.0
    assert rep.improvement_ci(x, y, 2000, np.random.default_rng(1)) == (lo, hi)  # reproducible


def test_stratified_indices_keep_every_task_in_its_columns():
    index = rep.stratified_indices([2, 3], reps=300, rng=np.random.default_rng(0))
    assert index.shape == (300, 5)
    assert set(np.unique(index[:, :2])) == {0, 1} and set(np.unique(index[:, 2:])) == {2, 3, 4}
    # the same draws as resampling the scores themselves
    scores = [np.array([1.0, 2.0]), np.array([10.0, 20.0, 30.0])]
    np.testing.assert_array_equal(np.concatenate(scores)[rep.stratified_indices([2, 3], 50, np.random.default_rng(4))],
                                  rep.stratified_resample(scores, 50, np.random.default_rng(4)))


def write_curve(path: Path, task: str, seed: int, scores: dict[int, float], mode: str = "finetune") -> None:
    """A run whose normalised score at each frame is `scores[frame]`."""
    path.mkdir(parents=True, exist_ok=True)
    expert = rep.EXPERT_SCORES[task]
    lines = [json.dumps({"task": task, "seed": seed, "frame": f, "mean_return": s * expert, "mode": mode})
             for f, s in scores.items()]
    (path / "eval.jsonl").write_text("\n".join(lines) + "\n")


def test_iqm_over_frames_by_hand(tmp_path):
    # four runs, normalised scores at frames 0, 10, 20 (and a fourth frame in one run only):
    curves = {("walker_stand", 0): {0: 0.0, 10: 0.4, 20: 1.0},
              ("walker_stand", 1): {0: 0.1, 10: 0.2, 20: 0.9},
              ("walker_walk", 0): {0: 0.2, 10: 0.8, 20: 0.1},
              ("walker_walk", 1): {0: 0.3, 10: 0.6, 20: 2.0, 30: 2.0}}
    for (task, seed), scores in curves.items():
        write_curve(tmp_path / f"{task}-{seed}", task, seed, scores)
    report = load(tmp_path, reps=500)
    (a,) = report.aggregates
    # IQM of four: trim one from each end, the mean of the middle two
    # frame 0:  0.0 | 0.1 0.2 | 0.3 -> 0.15;  frame 10: 0.2 | 0.4 0.6 | 0.8 -> 0.5
    # frame 20: 0.1 | 0.9 1.0 | 2.0 -> 0.95;  frame 30 is left out: not every run evaluated it
    np.testing.assert_array_equal(a.curve.x, [0, 10, 20])
    np.testing.assert_allclose(a.curve.value, [0.15, 0.5, 0.95])
    assert any("the 3 frames that every run evaluated (of 4" in n for n in report.notes)
    # the band: the same replicates of runs as the other aggregates, each run's whole curve at once
    matrix = np.array([[0.0, 0.4, 1.0], [0.1, 0.2, 0.9], [0.2, 0.8, 0.1], [0.3, 0.6, 2.0]])
    index = rep.stratified_indices([2, 2], 500, np.random.default_rng([0, rep.EVAL_MODES.index("finetune")]))
    lo, hi = np.percentile(rep.iqm(matrix[index].transpose(0, 2, 1)), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(a.curve.lo, lo)
    np.testing.assert_allclose(a.curve.hi, hi)
    assert np.all(a.curve.lo <= a.curve.hi)


def test_sweep_aggregates_improvement_and_profile(sweep):
    report = load(sweep)
    a, s = report.aggregates
    # finetune task means 0.75, 2/3, 1.0 -> 29/36 (the same as the mean of all nine: 7.25 / 9)
    assert a.mean == pytest.approx(29 / 36)
    assert a.mean_ci[0] <= a.mean <= a.mean_ci[1]
    # above 0.5: walker 0.75 1.0 (2/3), quadruped 1.0 (1/3), jaco 1.0 1.5 (2/3) -> 5/9;
    # above 1: jaco's 1.5 only -> 1/9; above 0: all
    assert a.profile.at(0.5)[0] == pytest.approx(5 / 9)
    assert a.profile.at(1.0)[0] == pytest.approx(1 / 9)
    assert a.profile.value[0] == 1.0 and a.profile.x[0] == 0.0
    assert np.all(np.diff(a.profile.value) <= 0)  # a distribution's tail never grows
    # the IQM at the last frame is the IQM of the final scores
    np.testing.assert_array_equal(a.curve.x, [0, 50000, 100000])
    assert a.curve.value[-1] == pytest.approx(a.iqm)
    assert s.mean == pytest.approx(0.15)
    # walker_stand is the one task both ran: 492, 738, 984 against 98.4, 196.8 -> every pair 1
    (imp,) = report.improvements
    assert (imp.x, imp.y, imp.tasks, imp.probability, imp.ci) == ("finetune", "scratch", ["walker_stand"], 1.0,
                                                                  (1.0, 1.0))


# ----------------------------------------------------------------------------- input


def test_folders_of_folders_are_searched_recursively(sweep, tmp_path):
    (tmp_path / "sweep" / "walker_stand" / "finetune" / "crashed").mkdir()
    (tmp_path / "sweep" / "walker_stand" / "finetune" / "crashed" / "config.yaml").write_text("task: x\n")
    files, skipped = rep.find_eval_files([sweep, sweep / "walker_stand", tmp_path / "nothing"])
    assert len(files) == 11  # 9 + 2 scratch, each once although two arguments cover walker_stand
    assert any("crashed: no eval.jsonl" in s for s in skipped)
    assert any("nothing: does not exist" in s for s in skipped)
    # a run directory given directly, and the eval.jsonl itself
    run = sweep / "jaco_reach_top_left" / "finetune" / "seed0"
    assert rep.find_eval_files([run])[0] == [run / "eval.jsonl"]
    assert rep.find_eval_files([run / "eval.jsonl"])[0] == [run / "eval.jsonl"]


GOOD = '{"task": "walker_stand", "seed": 0, "frame": 0, "mean_return": 1.0}'


@pytest.mark.parametrize(("line", "message"), [
    ('{"task": "walker_stand", "seed": 0, "frame": 10', "not valid JSON"),
    ('{"task": "walker_stand", "seed": 0, "frame": 10}', "missing key mean_return"),
    ('{"seed": 0, "mean_return": 3.0}', "missing keys task, frame"),
    ('{"task": "walker_stand", "seed": 0, "frame": 10, "mean_return": NaN}', "finite"),
    ('{"task": "walker_stand", "seed": 0, "frame": 10, "mean_return": Infinity}', "finite"),
    ('{"task": "walker_stand", "seed": 0, "frame": 10, "mean_return": 1.0, "returns": [1.0, -Infinity]}', "returns"),
    ('{"task": "walker_stand", "seed": 0, "frame": 10, "mean_return": "high"}', "mean_return"),
    ('{"task": "walker_stand", "seed": 0.5, "frame": 10, "mean_return": 1.0}', "seed must be an integer"),
    ('{"task": "walker_stand", "seed": 0, "frame": -10, "mean_return": 1.0}', "frame"),
    ('{"task": "walker_stand", "seed": 0, "frame": 10, "mean_return": 1.0, "mode": "offline"}', "mode"),
    ('[1, 2]', "expected a JSON object"),
])  # fmt: skip
def test_a_bad_line_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "run" / "eval.jsonl"
    path.parent.mkdir()
    path.write_text(f"{GOOD}\n\n{line}\n")  # the blank line 2 is skipped, but counted
    with pytest.raises(rep.ReportError, match=message) as exc:
        rep.read_eval_file(path)
    assert str(exc.value).startswith(f"{path}:3: ")


def test_the_same_run_in_two_files_is_an_error_naming_both(tmp_path):
    a = write_run(tmp_path / "a", "walker_walk", 4, 500.0)
    b = write_run(tmp_path / "b", "walker_walk", 4, 600.0)
    write_run(tmp_path / "c", "walker_walk", 4, 600.0, mode="scratch")  # another mode is another run
    files, _ = rep.find_eval_files([tmp_path])
    with pytest.raises(rep.ReportError) as exc:
        rep.collect_runs(files)
    msg = str(exc.value)
    assert "walker_walk seed 4 (finetune)" in msg and str(a / "eval.jsonl") in msg and str(b / "eval.jsonl") in msg


def test_a_frame_evaluated_twice_keeps_the_later_value_with_a_note(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"mean_return": 1.0', '"mean_return": 2.0') + "\n")
    notes: list[str] = []
    (run,) = rep.read_eval_file(path, notes)
    assert run.curve == {0: 2.0}
    assert len(notes) == 1 and f"{path}:2" in notes[0] and "line 1" in notes[0]


def test_tasks_without_an_expert_score_are_raw_and_left_out_of_the_aggregates(tmp_path):
    write_run(tmp_path / "w", "walker_run", 0, 398.0)
    write_run(tmp_path / "m0", "mw_reach", 0, 1200.0)
    write_run(tmp_path / "m1", "mw_reach", 1, 1300.0)
    report = load(tmp_path)
    mw = by_key(report)["mw_reach", "finetune"]
    assert mw.expert is None and mw.normalised is None
    assert mw.final_return == pytest.approx((1250.0, 50.0))
    (agg,) = report.aggregates
    assert (agg.n_tasks, agg.n_runs) == (1, 1) and agg.iqm == pytest.approx(0.5)
    assert any("mw_reach" in n and "left out of the aggregates" in n for n in report.notes)
    assert any("one seed only for walker_run" in n for n in report.notes)


# ----------------------------------------------------------------------------- command line


def test_cli_end_to_end(sweep, tmp_path, capsys):
    md = tmp_path / "out" / "report.md"
    assert main(["report", str(sweep), "--markdown", str(md), "--reps", "500", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("walker_stand") and "scratch" in line)
    assert row.split()[:3] == ["walker_stand", "scratch", "2"]
    assert "0.150 ± 0.050" in row and "147.6 ± 49.2" in row
    assert any(line.startswith("jaco_reach_top_left") and "1.000 ± 0.289" in line for line in lines)
    agg = next(line for line in lines if line.startswith("finetune") and "[" in line)
    assert agg.split()[:4] == ["finetune", "3", "9", "0.750"]
    # the table is aligned: every row of the first table is as wide as its rule or narrower
    rule = lines[2]
    assert set(rule) <= {"-", " "} and all(len(line) <= len(rule) for line in lines[3:7])
    text = md.read_text()
    assert text.startswith("# URLB report")
    assert "| task | mode | seeds | final frame | return | expert | normalised |" in text
    assert "| walker_stand | scratch | 2 | 100000 | 147.6 ± 49.2 | 984 | 0.150 ± 0.050 |" in text
    assert "| finetune | 3 | 9 | 0.750 [" in text and "500 replicates, seed 3" in text
    # rliable's other metrics: the mean beside the IQM, then tables of their own
    assert "| mode | tasks | runs | IQM | mean | optimality gap |" in text
    assert "| comparison | tasks | P(X > Y) |" in text
    assert "| finetune > scratch | 1 | 1.000 [1.000, 1.000] |" in text
    assert "| mode | tau 0.25 | tau 0.5 | tau 0.75 | tau 1 |" in text
    assert "| frame | finetune | scratch |" in text and "| 100000 | 0.750 [" in text


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    write_run(tmp_path / "ok", "walker_walk", 0, 500.0)
    bad = tmp_path / "bad" / "eval.jsonl"
    bad.parent.mkdir()
    bad.write_text(GOOD + "\n" + '{"task": "walker_walk", "seed": 1, "frame": 0, "mean_return": NaN}\n')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: mean_return must be a finite number" in err and "Traceback" not in err


def test_cli_nothing_to_report(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")
    assert main(["report", str(tmp_path / "run"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "run: no eval.jsonl" in err and "missing: does not exist" in err
    assert "no evaluations found" in err


def test_cli_skips_a_run_without_eval_file_and_reports_the_rest(sweep, tmp_path, capsys):
    (tmp_path / "failed").mkdir()
    assert main(["report", str(sweep), str(tmp_path / "failed"), "--reps", "100"]) == 0
    captured = capsys.readouterr()
    assert "failed: no eval.jsonl" in captured.err and "walker_stand" in captured.out


def test_plot_without_matplotlib_is_a_clear_error(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["report", str(sweep), "--plot", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install" in err
    assert not (tmp_path / "c.png").exists()


def test_plot_panels_and_png(sweep, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "mw", "mw_reach", 0, 1200.0)
    report = load(sweep, tmp_path / "mw", reps=200)
    fig = rep.plot(report)
    titles = [ax.get_title() for ax in fig.axes]
    # one panel per domain (walker, quadruped, jaco), one for the task without an expert score, then
    # every aggregate on an axis of its own (a lower gap is better: never on the IQM's axis)
    assert titles == ["walker", "quadruped", "jaco", "mw (no expert score)", "IQM (higher is better)",
                      "mean (higher is better)", "optimality gap (lower is better)", "probability of improvement",
                      "performance profile", "IQM over frames"]
    walker = fig.axes[0]
    assert [line.get_label() for line in walker.get_lines()] == ["walker_stand (finetune)", "walker_stand (scratch)"]
    frames, mean = walker.get_lines()[0].get_data()
    np.testing.assert_allclose(frames, [0, 50000, 100000])
    np.testing.assert_allclose(mean[-1], 0.75)
    a = report.aggregates[0]
    for ax, value in zip(fig.axes[4:7], (a.iqm, a.mean, a.gap), strict=True):
        assert [t.get_text() for t in ax.get_yticklabels()] == ["finetune", "scratch"]
        np.testing.assert_allclose(ax.get_lines()[0].get_xdata().astype(float), [value])  # the first mode's point
    assert [t.get_text() for t in fig.axes[7].get_yticklabels()] == ["P(finetune > scratch)"]
    profile, curve = fig.axes[8], fig.axes[9]
    assert [line.get_label() for line in profile.get_lines()] == ["finetune", "scratch"]
    np.testing.assert_allclose(profile.get_lines()[0].get_xdata(), a.profile.x)
    np.testing.assert_allclose(curve.get_lines()[0].get_data(), [a.curve.x, a.curve.value])

    png = tmp_path / "curves" / "report.png"
    assert main(["report", str(sweep), "--plot", str(png), "--reps", "100"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out
