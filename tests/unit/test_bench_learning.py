"""`choreo bench learning`'s report generator on a recorded results dict (no training): every
section is written with its numbers, plots and verdict, a missed target says so, a failed stage
says why; and the pure helpers that size the runs and judge the targets."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from choreo.launch.bench import learning as bl

PNG = b"\x89PNG\r\n\x1a\n"


def curve(values, every=25):
    return [[(i + 1) * every, float(v)] for i, v in enumerate(values)]


def run_info(name, frames, updates, seconds, cut_short=False, snapshot=True):
    return {"name": name, "run_dir": f"runs/{name}", "frames": frames, "planned_frames": frames, "warm_frames": 4000,
            "updates": updates, "seconds": seconds, "planned_seconds": seconds, "cut_short": cut_short,
            "snapshot": f"runs/{name}/snapshots/snapshot_{frames}.pt" if snapshot else None, "log": f"logs/{name}.log"}


HELD = [120.0, 300.0, 80.0, 250.0, 60.0, 200.0, 150.0, 90.0]
"""Eight skills held for one episode each: the top 5 are skills 1, 3, 5, 6, 0."""
FRESH = {"1": [210.0, 230.0], "3": [240.0, 260.0], "5": [150.0, 170.0], "6": [100.0, 120.0], "0": [90.0, 110.0]}


def picks(late):
    """[frame, episodes] of one run: random skills at frame 0 (the gate closed), then `late`."""
    return [[0, [{"2": 500, "7": 500}, {"4": 1000}]], [5000, [{"1": 600, "3": 400}, {"1": 1000}]], [10000, late]]


def recorded_finetune(labels=("S1",)):
    """A quick stage: per seed a run from scratch and one from each snapshot, the frozen control;
    fine-tuned ahead over the second half (by 47.5, 2 s.e. 24.5) but not at the last evaluation (by
    25, 2 s.e. 32.7); the best held skill 300 on its episode, 220 on fresh ones."""
    runs = []
    for seed in (0, 1, 2):
        r = run_info(f"walker_stand-scratch-seed{seed}", 10000, 770, 180.0, cut_short=seed == 2, snapshot=False)
        r.update(task="walker_stand", seed=seed, start="scratch", snapshot=None, status="ok", picks=[],
                 curve=[[0, 30.0], [5000, 150.0 + 10 * seed], [10000, 250.0 + 20 * seed]])
        runs.append(r)
        for i, label in enumerate(labels):
            r = run_info(f"walker_stand-{label}-finetune-seed{seed}", 10000, 770, 180.0)
            r.update(task="walker_stand", seed=seed, start="finetune", snapshot=label, status="ok",
                     curve=[[0, 40.0], [5000, 220.0 + 10 * seed + 40 * i], [10000, 275.0 + 20 * seed + 40 * i]],
                     picks=picks([{"3": 900, "6": 100}, {"3": 1000}]))
            if seed == 0:
                r["held"] = {"codes": list(range(8)), "returns": [h + 20.0 for h in HELD]}
            runs.append(r)
    r = run_info("walker_stand-S1-freeze-seed0", 10000, 770, 180.0)
    r.update(task="walker_stand", seed=0, start="freeze", snapshot="S1", status="ok",
             curve=[[0, 40.0], [5000, 210.0], [10000, 260.0]], picks=picks([{"2": 1000}]),
             held={"codes": list(range(8)), "returns": [h + (5.0 if i % 2 == 0 else -5.0) for i, h in enumerate(HELD)]})
    runs.append(r)
    for r in runs:
        r["final_return"] = r["curve"][-1][1]
    snapshots = [{"label": label, "path": f"runs/pre{label}/snapshot_25000.pt", "frames": 25000, "updates": 2100,
                  "size": "small", "task": "walker_stand", "obs": "states", "seed": 0, "num_skills": 8,
                  "status": "ok", "held": {"codes": list(range(8)), "returns": list(HELD)},
                  "remeasure": {"codes": [1, 3, 5, 6, 0], "returns": FRESH},
                  "random": {"returns": [100.0, 110.0, 120.0, 130.0]}} for label in labels]
    section = {"title": bl.TITLES["finetune"], "status": "ok", "allotted_s": 1080.0, "seconds": 1090.0,
               "scale": {"protocol": "quick", "task": "walker_stand", "seeds": [0, 1, 2], "frames": 10000,
                         "warm_frames": 4000, "planned_updates": 600, "eval_every": 5000, "eval_episodes": 2,
                         "second_half_from": 5000, "parallel": 1, "threads_per_run": 2, "top": 5,
                         "remeasure_episodes": 2, "random_episodes": 4, "drift_skills": 8, "num_skills": 8,
                         "random_skill_every": 125, "preset": "small", "paper": bl.PAPER_FINETUNE,
                         "reference": bl.REFERENCE_META},
               "snapshots": snapshots, "runs": runs,
               "reports": [{"label": label, "text": "Final performance per task\n", "rc": 0,
                            "markdown": f"finetune/report-{label}.md", "plot": f"finetune/report-{label}.png"}
                           for label in labels]}
    section["analysis"] = bl.analyse_finetune(section)
    section["target"] = bl.judge_finetune(section)
    return section


def recorded_results():
    """What `run` records, trimmed: resampling met, diversity missed, sparse half failed,
    fine-tuning missed (one run cut short), planning failed."""
    with_rs = run_info("walker_stand-resampling", 19300, 1530, 640.0)
    with_rs["curves"] = {"codebook/active_codes": curve([12, 30, 52, 61, 62, 63, 63, 64]),
                         "codebook/window_active_codes": curve([20, 45, 64, 64, 64, 64, 64, 64]),
                         "codebook/resampled_codes": curve([0, 0, 0, 0, 0, 0, 0, 9]),
                         "codebook/recon": curve([0.3, 0.1, 0.05, 0.03, 0.02, 0.02, 0.01, 0.01])}
    with_rs["final"] = {"active_codes": 63.2, "window_active_codes": 64.0, "resampled_codes": 9.0, "recon": 0.0123}
    without = run_info("walker_stand-no-resampling", 19300, 1528, 650.0)
    without["curves"] = {"codebook/active_codes": curve([12, 8, 5, 4, 4, 3, 3, 3]),
                         "codebook/window_active_codes": curve([20, 21, 21, 21, 21, 21, 21, 21]),
                         "codebook/resampled_codes": curve([0] * 8), "codebook/recon": curve([0.3, 0.2, 0.1, 0.08, 0.06,
                                                                                          0.05, 0.05, 0.05])}
    without["final"] = {"active_codes": 3.4, "window_active_codes": 21.0, "resampled_codes": 0.0, "recon": 0.0456}
    resampling = {"title": bl.TITLES["resampling"], "status": "ok", "allotted_s": 1290.0, "seconds": 1300.0,
                  "scale": {"task": "walker_stand", "obs": "states", "planned_frames": 19300, "warm_frames": 4000,
                            "num_codes": 64, "resample_every": 200, "log_every": 25, "seed": 0, "preset": "small"},
                  "runs": {"with": with_rs, "without": without}}
    resampling["target"] = bl.judge_resampling(resampling)

    rng = np.random.default_rng(0)
    policies = {}
    for name, width in (("skills", 0.3), ("random", 0.5), ("explore", 0.6)):
        positions = np.cumsum(rng.normal(0, width / 10, (8, 11, 2)), axis=1) + [0.0, 1.2]
        policies[name] = bl.spread(positions)
        policies[name]["paths"] = positions.tolist()
    diversity = {"title": bl.TITLES["diversity"], "status": "ok", "allotted_s": 140.0, "seconds": 120.0,
                 "scale": {"snapshot": "runs/walker_stand-resampling/snapshots/snapshot_19300.pt",
                           "snapshot_frames": 19300, "episodes": 8, "steps": 10, "cell": [0.25, 0.1], "seed": 0,
                           "modes": {"skills": "mode", "random": "sample", "explore": "sample"}},
                 "policies": policies,
                 "visualize": {"dir": "visualize", "steps": 56, "error": "RuntimeError: no EGL display"}}
    diversity["target"] = bl.judge_diversity(diversity)

    sparse = {"title": bl.TITLES["sparse"], "status": "partial", "allotted_s": 575.0, "seconds": 560.0,
              "error": "jaco_reach_top_left: RuntimeError: the Jaco pretraining diverged",
              "scale": {"skill_every": 50, "goal_set": 1, "goals": [0, 7, 14, 21, 28, 35, 42, 49],
                        "episodes_per_goal": 8, "jaco_episodes": 64,
                        "rule": "an episode succeeds when its return exceeds 0 (Meta-World) or 1e-4 (Jaco)",
                        "paper": "50 goals x 100 episodes per goal set"},
              "tasks": {"mw_reach": {"status": "ok", "metric": "success", "episodes": 8, "goals": [0, 7],
                                     "pretrain": run_info("mw_reach-pretrain", 18400, 520, 230.0),
                                     "skills": {"success": 0.281, "goal_any_success": 0.625, "goals_found_any": 5,
                                                "goals": 8,
                                                "episode_success": 0.281, "episodes": 64, "episodes_found": 18,
                                                "mean_return": 48.2},
                                     "random": {"success": 0.094, "goal_any_success": 0.375, "goals_found_any": 3,
                                                "goals": 8,
                                                "episode_success": 0.094, "episodes": 64, "episodes_found": 6,
                                                "mean_return": 12.1}},
                        "jaco_reach_top_left": {"status": "failed", "metric": "success", "episodes": 64,
                                                "error": "RuntimeError: the Jaco pretraining diverged"}}}
    sparse["target"] = bl.judge_sparse(sparse)

    finetune = recorded_finetune()

    planning = {"title": bl.TITLES["planning"], "status": "failed", "allotted_s": 500.0, "seconds": 12.0,
                "error": "dads: ValueError: point_mass_nav broke; choreographer: ValueError: point_mass_nav broke",
                "traceback": "Traceback (most recent call last):\n  ...\nValueError: point_mass_nav broke\n",
                "scale": {"task": "point_mass_nav", "episodes": 40, "reference": "README"},
                "agents": {"dads": {"status": "failed", "error": "ValueError: point_mass_nav broke"},
                           "choreographer": {"status": "failed", "error": "ValueError: point_mass_nav broke"}}}
    planning["target"] = bl.judge_planning(planning)

    return {"format": "choreo-bench-learning", "version": 1, "command": "choreo bench learning --budget-minutes 60",
            "started": "2026-11-29 21:00:00", "preset": "small", "seed": 0, "finetune_seeds": [0, 1, 2],
            "execution": "local", "machine": {"cpus": 2, "torch_threads": 2, "gpu": False},
            "budget": {"minutes": 60.0, "seconds": 3600.0, "fractions": dict(bl.FRACTIONS),
                       "stages": {s: {"allotted_s": 100.0, "used_s": 90.0} for s in bl.STAGES}},
            "calibration": {"pretrain_update_s": 0.41, "finetune_update_s": 0.17, "dads_update_s": 0.01,
                            "seconds": 3.2},
            "selected": list(bl.STAGES), "elapsed_s": 3550.0,
            "stages": {"resampling": resampling, "diversity": diversity, "sparse": sparse, "finetune": finetune,
                       "planning": planning}}


def section_text(report: str, index: int) -> str:
    """The text of section `index` (1-5) of report.md, up to the next one."""
    start = report.index(f"## {index}. ")
    end = report.find(f"## {index + 1}. ", start)
    return report[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    results = recorded_results()
    before = copy.deepcopy(results)
    out = tmp_path_factory.mktemp("bench")
    path = bl.write_report(results, out)
    assert results == before  # pure: the results are not changed
    return out, path.read_text()


def test_every_section_is_written_with_its_numbers(written):
    out, report = written
    assert (out / "report.md").is_file()
    for i, stage in enumerate(bl.STAGES, 1):
        assert f"## {i}. {bl.TITLES[stage]}" in report
    assert "## Summary" in report and "## Budget" in report
    one = section_text(report, 1)
    assert "| with resampling | 63.2 | 64.0 | 9 | 0.0123 |" in one
    assert "| without resampling | 3.4 | 21.0 | 0 | 0.0456 |" in one
    assert "19,300" in one and "1,530" in one and "resampling every 200" in one
    two = section_text(report, 2)
    skills = recorded_results()["stages"]["diversity"]["policies"]["skills"]
    assert f"| skills | {skills['mean_pairwise_distance']:.3f} | {skills['cells']} |" in two
    three = section_text(report, 3)
    assert "| mw_reach | skills | 0.281 | 5 of 8 goals in any episode |" in three
    assert "| mw_reach | random | 0.094 | 3 of 8 goals in any episode |" in three
    assert "an episode succeeds when its return exceeds 0 (Meta-World) or 1e-4 (Jaco)" in three
    assert "Fewer goals and episodes than the paper" in three
    four = section_text(report, 4)
    assert "| second half of the budget | 262.5 ± 8.7 (3) | 215.0 ± 8.7 (3) | 47.5 | 24.5 | **met** |" in four
    assert "| last evaluation | 295.0 ± 11.5 (3) | 270.0 ± 11.5 (3) | 25.0 | 32.7 | **missed** |" in four
    assert "| S1 | skill 1: 300.0 -> 220.0 ± 10.0 (2) | 204.0 -> 168.0 ± 20.0 (10) | skill 3: 250.0 ± 10.0 (2) " \
           "| 135.0 | 115.0 ± 6.5 (4) | 295.0 ± 11.5 (3) | **met** |" in four
    assert "| S1 | fine-tuned | 10,000 | 1.5 | 100% (62%) | skill 3 (95%; held rank 2) | 245.0 (156.2) |" in four
    assert "| S1 | walker_stand-S1-freeze-seed0 | 8 | 156.2 -> 156.2 | 0.0 | 5.0 | 1.00 |" in four
    assert "25,000 frames, 2,100 updates, size `small`" in four
    assert "(cut short)" in four and "choreo report" in four and "`--quick`: runs scaled to the budget" in four
    assert "claim 4 holds in part" in four
    assert "| stage | fraction | allotted | used | status |" in report
    assert "| resampling | 36% |" in report and "pretraining 0.41 s, fine-tuning 0.17 s" in report


def test_plots_are_written_for_the_sections_with_numbers(written):
    out, report = written
    for name in ("resampling", "diversity", "sparse", "finetune", "finetune_picks", "finetune_drift"):
        path = out / "plots" / f"{name}.png"
        assert path.read_bytes().startswith(PNG), name
        assert f"(plots/{name}.png)" in report
    assert not (out / "plots" / "planning.png").exists()  # the planning stage failed: nothing to draw


def test_a_missed_target_is_reported_as_missed(written):
    _, report = written
    assert "**Target**" in section_text(report, 1) and "**met**" in section_text(report, 1)
    two = section_text(report, 2)
    assert "**missed**" in two and "Missed at this scale; it likely needs" in two
    four = section_text(report, 4)
    assert "**missed**" in four and "the paper's protocol (without --quick)" in four
    summary = report[report.index("## Summary"):report.index("## Budget")]
    # sparse: met on mw, jaco failed; fine-tuning: two lines, missed above scratch, met against the held skills
    assert summary.count("**missed**") == 2 and summary.count("**met**") == 3
    assert "above scratch: **missed**; at least the best held skill: **met**" in summary
    assert "(stage partial)" in summary


def test_a_failed_stage_is_reported_with_its_error(written):
    _, report = written
    five = section_text(report, 5)
    assert "**This stage failed**" in five and "point_mass_nav broke" in five and "traceback" in five
    summary = report[report.index("## Summary"):report.index("## Budget")]
    assert "**failed**" in summary
    three = section_text(report, 3)
    assert "**Part of this stage failed**" in three and "the Jaco pretraining diverged" in three
    assert "| jaco_reach_top_left | failed |" in three
    two = section_text(report, 2)
    assert "`choreo visualize` failed: `RuntimeError: no EGL display`" in two


def test_the_report_renders_from_json_and_from_a_partial_run(tmp_path):
    results = json.loads(json.dumps(recorded_results()))
    bl.write_report(results, tmp_path / "a")
    # A bench interrupted after stage 2: the later sections say they did not run.
    partial = recorded_results()
    partial["interrupted"] = True
    partial["stages"] = {k: partial["stages"][k] for k in ("resampling", "diversity")}
    partial["stages"]["diversity"] = {"title": bl.TITLES["diversity"], "status": "running", "scale": {}}
    report = bl.write_report(partial, tmp_path / "b").read_text()
    assert "**The bench was interrupted**" in report
    assert "This stage did not finish" in section_text(report, 2)
    assert "Not run (the bench stopped before this stage)." in section_text(report, 3)
    lines = bl.summary_lines(partial)
    assert lines[0].endswith("ok, target met") and lines[4].endswith("not run")


def test_judges_read_the_numbers():
    results = recorded_results()["stages"]
    assert results["resampling"]["target"]["met"] is True
    assert results["diversity"]["target"]["met"] is False
    assert results["sparse"]["target"]["met"] is None and results["sparse"]["target"]["per_task"]["mw_reach"] is True
    assert results["finetune"]["target"]["met"] is False
    planning = {"agents": {"dads": {"plan": {"normalised_distance": 0.35, "normalised_distance_se": 0.03},
                                    "random": {"normalised_distance": 1.39, "normalised_distance_se": 0.14}},
                           "choreographer": {"plan": {"normalised_distance": 0.99, "normalised_distance_se": 0.02},
                                             "random": {"normalised_distance": 1.0, "normalised_distance_se": 0.02}}}}
    target = bl.judge_planning(planning)
    assert target["per_agent"] == {"dads": True, "choreographer": False} and target["met"] is False
    del planning["agents"]["choreographer"]
    assert bl.judge_planning(planning)["met"] is True


def test_runs_are_sized_to_their_time():
    long = bl.plan_run(600.0, update_s=0.4, steps_per_update=10, default_warm=4000, min_warm=320, step_s=0.0015)
    assert long.warm == 4000 and long.steps == long.warm + 10 * long.updates
    assert abs(long.seconds - 600.0) < 1.0 and long.updates > 1000
    short = bl.plan_run(20.0, update_s=0.4, steps_per_update=10, default_warm=4000, min_warm=320, step_s=0.0015)
    assert 320 <= short.warm < 4000 and short.updates >= bl.MIN_UPDATES
    repeated = bl.plan_run(60.0, update_s=0.4, steps_per_update=10, default_warm=4000, min_warm=320, step_s=0.0015,
                           action_repeat=2)
    assert repeated.frames == 2 * repeated.steps


def test_the_budget_is_shared_over_the_stages_left():
    now = [0.0]
    budget = bl.Budget(1000.0 + bl.REPORT_RESERVE_S, {"a": 0.5, "b": 0.25, "c": 0.25}, clock=lambda: now[0])
    assert budget.allot("a", ["a", "b", "c"]) == pytest.approx(500.0)
    now[0] = 300.0  # stage a used less than its share: b and c share what is left
    assert budget.allot("b", ["b", "c"]) == pytest.approx(350.0)
    now[0] = 2000.0
    assert budget.allot("c", ["c"]) == 0.0


def test_log_cadence_hits_every_resampling_check_and_spread_counts_cells():
    for updates in (5, 300, 1530, 20000):
        every = bl.log_every_for(updates, 200)
        assert 200 % every == 0 and (updates // every <= 2 * bl.LOG_POINTS or every == 200)
    positions = np.zeros((3, 2, 2))
    positions[:, -1] = [[0.0, 1.0], [3.0, 1.0], [0.0, 5.0]]
    stats = bl.spread(positions)
    assert stats["mean_pairwise_distance"] == pytest.approx((3 + 4 + 5) / 3)
    assert stats["final_cells"] == 3 and stats["cells"] == 4  # the three ends and the shared start
    sizes = bl.eval_sizes(115.0)
    assert sizes["mw_goals"] == sizes["mw_episodes"] >= 2 and 4 <= sizes["jaco_episodes"] <= 100
    assert bl.spread_goals(8)[0] == 0 and bl.spread_goals(8)[-1] == 49


def test_update_costs_follow_the_runs_that_were_mostly_updates():
    costs = bl.Costs(pretrain=0.4, finetune=0.2, dads=0.01)
    plan = bl.plan_run(600.0, update_s=0.4, steps_per_update=10, default_warm=4000, min_warm=320, step_s=0.0015)
    costs.observe("pretrain", plan.seconds + plan.updates * 0.2, plan)  # each update took 0.6 s
    assert costs.pretrain == pytest.approx(0.5)
    costs.observe("pretrain", 10.0, plan)  # far faster than possible: at most halved
    assert costs.pretrain == pytest.approx(0.375)
    short = bl.plan_run(10.0, update_s=0.2, steps_per_update=10, default_warm=4000, min_warm=320, step_s=0.0015)
    costs.observe("finetune", 1.0, short)  # mostly start-up and warm-up: not counted
    assert costs.finetune == 0.2


def test_claim_four_is_two_standard_errors_over_seeds_and_snapshots():
    better = bl.above_by_two_se([300.0, 320.0, 340.0], [250.0, 270.0, 290.0])
    assert better["difference"] == pytest.approx(50.0)
    assert better["se"] == pytest.approx(np.hypot(20 / np.sqrt(3), 20 / np.sqrt(3)))  # 16.33
    assert better["met"] is True and better["better"]["n"] == 3
    assert bl.above_by_two_se([300.0, 320.0, 340.0], [270.0, 290.0, 310.0])["met"] is False  # 30 < 32.7
    assert bl.above_by_two_se([400.0], [100.0, 120.0])["met"] is None  # one run: no standard error
    assert bl.above_by_two_se([], [1.0])["difference"] is None
    assert bl.second_half([[0, 10.0], [50, 20.0], [100, 40.0]], 50) == pytest.approx(30.0)
    assert bl.second_half([[0, 10.0]], 50) is None

    section = recorded_finetune(labels=("S1", "S2"))  # S2's runs 40 above S1's
    claim = section["analysis"]["claim"]
    assert claim["second_half"]["better"]["n"] == 6 and claim["second_half"]["worse"]["n"] == 3
    assert claim["second_half"]["better"]["mean"] == pytest.approx(262.5 + 20.0)
    assert claim["last"]["difference"] == pytest.approx(25.0 + 20.0)
    s1, s2 = (section["analysis"]["snapshots"][k]["claim"]["last"] for k in ("S1", "S2"))
    assert s1["difference"] == pytest.approx(25.0) and s1["met"] is False
    assert s2["difference"] == pytest.approx(65.0) and s2["met"] is True
    target = section["target"]  # pooled: 45 at the last evaluation, 2 s.e. 33.3
    assert target["per_line"] == {"above scratch": True, "at least the best held skill": True}
    assert target["met"] is True
    one = recorded_finetune()["target"]
    assert one["second_half"]["met"] is True and one["last"]["met"] is False and one["met"] is False


def test_held_skills_are_chosen_on_one_episode_and_measured_again():
    assert bl.top_skills([1.0, 5.0, 5.0, 3.0], 3) == [1, 2, 3]  # a tie: the lower index first
    held = bl.held_summary(HELD, FRESH, 5)
    assert held["top"] == [1, 3, 5, 6, 0] and held["best"] == 1 and held["order"][-1] == 4
    assert held["best_selection"] == 300.0 and held["top_selection"] == pytest.approx(204.0)
    assert held["best_remeasured"] == {"mean": 220.0, "se": pytest.approx(10.0), "n": 2}
    assert held["top_remeasured"]["mean"] == pytest.approx(168.0) and held["top_remeasured"]["n"] == 10
    assert held["best_of_top_remeasured"]["skill"] == 3 and held["best_of_top_remeasured"]["mean"] == 250.0
    assert held["median"] == pytest.approx(135.0)
    versus = recorded_finetune()["analysis"]["snapshots"]["S1"]["versus_held"]
    assert versus == {"finetune_last": pytest.approx(295.0), "best_remeasured": 220.0, "met": True}


def test_the_meta_controllers_choices_rank_against_the_held_skills():
    picks = [[0, [{"2": 500, "7": 500}]], [10, [{"3": 900, "6": 100}, {"3": 1000}]], [10, [{"4": 1000}]]]
    counts = bl.pick_counts(picks, 8)
    assert list(counts) == [0, 10]
    np.testing.assert_array_equal(counts[10], [0, 0, 0, 1900, 1000, 0, 100, 0])
    rank = bl.pick_ranking(counts[10], HELD, 5)
    assert rank["steps"] == 3000 and rank["share_top"] == pytest.approx(2000 / 3000)
    assert rank["chance_top"] == pytest.approx(5 / 8)
    assert rank["most_picked"] == 3 and rank["most_picked_rank"] == 2 and rank["skills_picked"] == 3
    assert rank["weighted_held"] == pytest.approx((1900 * 250 + 1000 * 60 + 100 * 150) / 3000)
    assert bl.pick_ranking(counts[0], HELD, 5)["most_picked_rank"] == 7  # skill 2 (80): 7th of 8
    assert bl.pick_ranking(np.zeros(8), HELD) == {"steps": 0}
    assert bl.picks_per_episode(picks) == {0: 2.0, 10: pytest.approx(4 / 3)}
    assert bl.pick_lean({"share_top": 0.9, "chance_top": 5 / 64}) == "concentrate"
    assert bl.pick_lean({"share_top": 0.3, "chance_top": 5 / 64}) == "lean"
    assert bl.pick_lean({"share_top": 0.1, "chance_top": 5 / 64}) == "none"
    rows = recorded_finetune()["analysis"]["snapshots"]["S1"]["picks_finetune"]
    assert [r["frame"] for r in rows] == [0, 5000, 10000]
    assert rows[0]["share_top"] == 0.0 and rows[-1]["share_top"] == 1.0 and rows[-1]["most_picked"] == 3


def test_executor_drift_compares_the_same_skills_on_the_same_episodes():
    d = bl.drift([100.0, 200.0, 300.0], [130.0, 170.0, 360.0], top=[2])
    assert d["mean_change"] == pytest.approx(20.0) and d["mean_abs_change"] == pytest.approx(40.0)
    assert d["rank_correlation"] == pytest.approx(1.0) and (d["top_before"], d["top_after"]) == (300.0, 360.0)
    assert bl.drift([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["rank_correlation"] == pytest.approx(-1.0)
    assert bl.rank_correlation([1.0, 1.0], [1.0, 2.0]) is None
    assert bl.drift_codes(64, 16)[:3] == [0, 4, 8] and bl.drift_codes(64, 16)[-1] == 63
    assert bl.drift_codes(8, None) == list(range(8)) and len(bl.drift_codes(64, 16)) == 16
    rows = {r["start"]: r for r in recorded_finetune()["analysis"]["snapshots"]["S1"]["drift"]}
    assert rows["finetune"]["mean_change"] == pytest.approx(20.0)
    assert rows["freeze"]["mean_change"] == pytest.approx(0.0) and rows["freeze"]["mean_abs_change"] == 5.0
    assert rows["finetune"]["top_before"] == pytest.approx(204.0)


def test_the_runs_of_the_stage_pair_up_seed_by_seed(tmp_path):
    snapshots = [tmp_path / "a.pt", tmp_path / "b.pt"]
    specs = bl.finetune_specs(snapshots, ["S1", "S2"], [0, 1])
    assert [(s.start, s.snapshot, s.seed) for s in specs] == [
        ("scratch", None, 0), ("finetune", "S1", 0), ("finetune", "S2", 0),
        ("scratch", None, 1), ("finetune", "S1", 1), ("finetune", "S2", 1), ("freeze", "S1", 0)]
    assert "from_scratch=true" in specs[0].overrides
    assert f"snapshot={snapshots[1].resolve()}" in specs[2].overrides
    assert "agent.finetune.freeze_skills=true" in specs[-1].overrides
    assert len({s.name for s in specs}) == len(specs)
    assert bl.default_parallel(2) == 1 and bl.default_parallel(16) == 8 and bl.default_parallel(1) == 1


def test_the_reading_follows_the_figures():
    section = recorded_finetune()
    reading = bl.finetune_reading(section)
    assert "by two standard errors on one of the two only: claim 4 holds in part" in reading[0]
    assert any("its choices concentrate on the skills that do best held still" in r for r in reading)
    # The same runs, the choices spread over the skills outside the top 5: the reading says so.
    for r in section["runs"]:
        if r["start"] == "finetune":
            r["picks"] = picks([{"2": 500, "4": 250, "7": 250}])
    section["analysis"] = bl.analyse_finetune(section)
    reading = bl.finetune_reading(section)
    assert any("its choices do not favour" in r for r in reading)
    assert reading[-1].startswith("Together: the meta-controller's choices do not single out")
    # One seed a side: not decided.
    section["runs"] = [r for r in section["runs"] if r["seed"] == 0]
    section["analysis"] = bl.analyse_finetune(section)
    assert "claim 4 is not decided" in bl.finetune_reading(section)[0]
    assert bl.judge_finetune(section)["per_line"]["above scratch"] is None


def test_without_quick_the_runs_are_the_papers_protocol_outside_the_budget(tmp_path):
    import io

    bench = bl.Bench(tmp_path, bl.Budget(600.0, {"finetune": 0.0, "planning": 0.14}), io.StringIO(),
                     ["finetune", "planning"], threads=2)
    bench.costs = bl.Costs(pretrain=0.4, finetune=0.25, dads=0.01)
    overrides = ["mode=finetune", "env.task=walker_stand", "from_scratch=true"]
    plan = bl.protocol_plan(bench, overrides)
    assert (plan.frames, plan.eval_every, plan.eval_episodes) == (100_000, 10_000, 10)
    assert plan.updates > 9000 and plan.seconds > plan.updates * 0.25
    config = bench.run_config("run", "finetune", overrides, plan, tmp_path, sized=False)
    assert config.learner.total_frames == 100_000 and config.eval.every_frames == 10_000
    assert config.learner.threads == 2 and config.monitor.media_every == 0
    threads = bench.run_config("run", "finetune", overrides, plan, tmp_path, ["learner.threads=1"], sized=False)
    assert threads.learner.threads == 1  # a job's own share of the cores wins over the bench's
    # The protocol takes no share of the budget: the stages after it get theirs.
    assert bench.budget.allot("finetune", ["finetune", "planning"]) == 0.0
    assert bench.budget.allot("planning", ["planning"]) == pytest.approx(600.0 - bl.REPORT_RESERVE_S, abs=1.0)
