"""Smoke run of `choreo bench learning --budget-minutes 3`: the whole pipeline at the small size,
scaled down to a few minutes, writes every section of its report, its plots and results.json.
No thresholds on what was learned: at this scale the targets are expected to be missed."""

from __future__ import annotations

import json

import pytest

from choreo.launch.bench import learning as bl

pytestmark = pytest.mark.slow


def test_three_minute_run_writes_every_section(tmp_path):
    out = tmp_path / "bench"
    assert bl.run(["--budget-minutes", "3", "--out", str(out)]) == 0

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
    assert len(stages["finetune"]["runs"]) == 2 * len(bl.FINETUNE_SEEDS)
    assert {"finetune", "scratch"} <= set(stages["finetune"]["summary"]["walker_stand"])
    for agent in ("dads", "choreographer"):
        entry = stages["planning"]["agents"][agent]
        assert entry["plan"]["normalised_distance"] > 0 and entry["random"]["normalised_distance"] > 0

    report = (out / "report.md").read_text()
    for i, stage in enumerate(bl.STAGES, 1):
        assert f"## {i}. {bl.TITLES[stage]}" in report
        assert f"(plots/{stage}.png)" in report
        assert (out / "plots" / f"{stage}.png").read_bytes().startswith(b"\x89PNG")
    assert report.count("**Target**") == len(bl.STAGES)
    assert (out / "visualize" / "codebook.png").is_file() and (out / "finetune" / "report.md").is_file()
