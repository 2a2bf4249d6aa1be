"""The README's tour, run as written: the bash block after the `<!-- tour` marker, in a fresh
directory, with the venv's tools on the PATH as `source .venv/bin/activate` puts them. It must exit
0 and leave what the README says it leaves (snapshots, the fine-tuning's evaluations, the report,
the skills' GIFs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def tour_block() -> str:
    """The first ```bash block after the tour marker, without `tensorboard` lines (a server)."""
    text = README.read_text()
    marker = text.find("<!-- tour")
    assert marker >= 0, "README.md has no <!-- tour --> marker before its tour block"
    found = re.search(r"```bash\n(.*?)```", text[marker:], re.S)
    assert found, "README.md has no ```bash block after the tour marker"
    lines = found.group(1).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("tensorboard")) + "\n"


def test_tour_block_is_found():
    block = tour_block()
    for command in ("choreo pretrain", "choreo finetune", "choreo report", "choreo visualize"):
        assert command in block


def test_readme_tour_runs_as_written(tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(["bash", "-e", "-c", tour_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"

    tour = tmp_path / "runs" / "tour"
    snapshots = tour / "pre" / "snapshots"
    assert (snapshots / "snapshot_1000.pt").is_file() and (snapshots / "snapshot_2000.pt").is_file()
    evals = (tour / "finetune" / "eval.jsonl").read_text().splitlines()
    assert len(evals) >= 2, evals
    assert (tour / "report.md").stat().st_size > 0 and (tour / "report.png").stat().st_size > 0
    gifs = sorted((snapshots / "visualize").glob("skill_*.gif"))
    assert len(gifs) == 8, gifs  # the tiny codebook's 8 skills
    assert (snapshots / "visualize" / "codebook.png").is_file()
    policy = torch.jit.load(str(tour / "skill_3.pt"))  # runs without choreo's classes
    state = policy.initial_state(1)
    action, state = policy.step(torch.zeros(1, 24), state)
    assert action.shape == (1, 6) and int(state["skill"][0]) == 3
