"""Smoke run of `choreo bench learning --budget-minutes 3 --quick --seeds 2`: the whole pipeline at
the small size, scaled down to a few minutes (fine-tuning too, instead of the paper's protocol),
writes every section of its report, its plots and results.json. No thresholds on what was learned:
at this scale the targets are expected to be missed."""

from __future__ import annotations

import json

import pytest

from choreo.launch.bench import learning as bl

pytestmark = pytest.mark.slow


def test_three_minute_run_writes_every_section(tmp_path):
    out = tmp_path / "bench"
    assert bl.run(["--budget-minutes", "3", "--quick", "--seeds", "2", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == list(bl.STAGES)
    for stage, section in stages.items():
        assert section["status"] == "ok", (stage, section.get("error"), section.get("traceback"))
        assert "met" in section["target"], stage
    assert set(results["budget"]["stages"]) == set(bl.STAGES)
    assert results["calibration"]["pretrain_update_s"] > 0

    # Every section has its numbers.
    runs = stages["resampling"]["runs"]
    assert runs["with"]["final"]["active_codes"] is not None and runs["without"]["final"]["active_codes"] is not None
    assert set(stages["diversity"]["policies"]) == {"skills", "random", "explore"}
    assert not stages["diversity"]["visualize"]["error"] and stages["diversity"]["visualize"]["gifs"]
    for task, entry in stages["sparse"]["tasks"].items():
        assert entry["skills"][entry["metric"]] is not None and entry["random"][entry["metric"]] is not None, task
    finetune = stages["finetune"]
    assert [r["start"] for r in finetune["runs"]] == ["scratch", "finetune", "scratch", "finetune", "freeze"]
    assert all(r["curve"] for r in finetune["runs"]) and finetune["scale"]["protocol"] == "quick"
    (snapshot,) = finetune["snapshots"]
    assert len(snapshot["held"]["returns"]) == snapshot["num_skills"] == finetune["scale"]["num_skills"]
    assert len(snapshot["remeasure"]["codes"]) == bl.TOP_SKILLS and snapshot["random"]["returns"]
    analysis = finetune["analysis"]
    assert analysis["claim"]["last"]["better"]["n"] == 2 and analysis["claim"]["last"]["worse"]["n"] == 2
    s1 = analysis["snapshots"]["S1"]
    assert s1["held"]["best_remeasured"]["n"] == finetune["scale"]["remeasure_episodes"]
    assert s1["picks_finetune"] and all(p["steps"] > 0 for p in s1["picks_finetune"])  # from eval.jsonl
    assert {d["start"] for d in s1["drift"]} == {"finetune", "freeze"}
    assert set(finetune["target"]["per_line"]) == {"above scratch", "at least the best held skill"}
    for agent in ("dads", "choreographer"):
        entry = stages["planning"]["agents"][agent]
        assert entry["plan"]["normalised_distance"] > 0 and entry["random"]["normalised_distance"] > 0

    report = (out / "report.md").read_text()
    for i, stage in enumerate(bl.STAGES, 1):
        assert f"## {i}. {bl.TITLES[stage]}" in report
        assert f"(plots/{stage}.png)" in report
        assert (out / "plots" / f"{stage}.png").read_bytes().startswith(b"\x89PNG")
    assert report.count("**Target**") == len(bl.STAGES)
    assert (out / "visualize" / "codebook.png").is_file() and (out / "finetune" / "report-S1.md").is_file()
    for plot in ("finetune_picks", "finetune_drift"):
        assert (out / "plots" / f"{plot}.png").read_bytes().startswith(b"\x89PNG") and f"(plots/{plot}.png)" in report
    assert "What the measurements point to" in report
