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

    finetune_runs = []
    for seed in (0, 1, 2):
        for mode, base in (("finetune", 300.0), ("scratch", 250.0)):
            r = run_info(f"walker_stand-{mode}-seed{seed}", 11760, 770, 180.0, cut_short=(seed == 2 and mode == "scratch"),
                         snapshot=False)
            r.update(task="walker_stand", seed=seed, mode=mode,
                     curve=[[0, 30.0 + seed], [5880, base / 2 + 10 * seed], [11760, base + 20 * seed]])
            r["final_return"] = r["curve"][-1][1]
            finetune_runs.append(r)
    finetune = {"title": bl.TITLES["finetune"], "status": "ok", "allotted_s": 1080.0, "seconds": 1090.0,
                "scale": {"tasks": ["walker_stand"], "seeds": [0, 1, 2], "frames": 11760, "warm_frames": 4000,
                          "eval_every": 2940, "eval_episodes": 10, "snapshot": "runs/x/snapshot.pt",
                          "paper": "100k fine-tuning frames"},
                "runs": finetune_runs, "notes": ["walker_walk is left out below 120 budget minutes"],
                "summary": {"walker_stand": {"finetune": {"mean": 320.0, "se": 11.5, "n": 3},
                                             "scratch": {"mean": 290.0, "se": 11.5, "n": 3},
                                             "difference": 30.0, "difference_se": 16.26}},
                "report": {"text": "Final performance per task\nwalker_stand  finetune  3  320.0 ± 11.5\n", "rc": 0,
                           "markdown": "finetune/report.md", "plot": "finetune/report.png"}}
    finetune["target"] = bl.judge_finetune(finetune)

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
    assert "| walker_stand | 320.0 ± 11.5 (3) | 290.0 ± 11.5 (3) | 30.0 | 16.3 |" in four
    assert "(cut short)" in four and "walker_walk is left out" in four and "choreo report" in four
    assert "| stage | fraction | allotted | used | status |" in report
    assert "| resampling | 36% |" in report and "pretraining 0.41 s, fine-tuning 0.17 s" in report


def test_plots_are_written_for_the_sections_with_numbers(written):
    out, report = written
    for name in ("resampling", "diversity", "sparse", "finetune"):
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
    assert "**missed**" in four and "hours" in four  # 30.0 is not above 2 x 16.26
    summary = report[report.index("## Summary"):report.index("## Budget")]
    assert summary.count("**missed**") == 2 and summary.count("**met**") == 2  # sparse: met on mw, jaco failed
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
