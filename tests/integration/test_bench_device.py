"""The GPU check's script (`choreo bench device`) on this machine's CPU, at the tiny size: every step
runs and writes its figures, so that its first run on a lent GPU is not its first run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from choreo.launch.bench import device

pytestmark = pytest.mark.slow


def test_the_device_check_runs_every_step_on_the_cpu_and_writes_one_json(tmp_path):
    # In a process of its own, as on the GPU machine: torch.compile's worker processes and the
    # ranks' go with it.
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "choreo.launch.cli", "bench", "device", "--quick", "--out", str(out),
                           "--device", "cpu", "--pretrain-seconds", "10"], capture_output=True, text=True, timeout=900)
    figures = json.loads(out.read_text())
    assert done.returncode == 0, ({name: step.get("error") for name, step in figures["steps"].items()},
                                  done.stdout[-3000:], done.stderr[-3000:])
    assert figures["device"] == "cpu" and figures["size"] == "tiny"
    assert list(figures["steps"]) == list(device.STEPS)
    assert all(step["status"] == "ok" for step in figures["steps"].values())

    learner = figures["steps"]["learner"]
    assert set(learner) - {"status", "seconds"} == {"states_fp32", "states_bf16", "pixels_fp32", "pixels_bf16"}
    for name in ("states_fp32", "states_bf16", "pixels_fp32", "pixels_bf16"):
        r = learner[name]
        assert r["precision"] == name.split("_")[1]
        assert r["flops_gflop"]["pretrain"]["total"] > 0 and r["pretrain"]["matmul_fraction"] > 0
        assert r["machine"]["matmul_fp32_gflops"] > 0
    assert "finetune" in learner["states_fp32"] and "finetune" not in learner["pixels_fp32"]
    # Pixels add the convolutions of the encoder and decoder to the world model's operations.
    assert learner["pixels_fp32"]["flops_gflop"]["pretrain"]["world_model"] > \
        learner["states_fp32"]["flops_gflop"]["pretrain"]["world_model"]

    compiled = figures["steps"]["compile"]
    assert compiled["eager"]["pretrain"]["total_ms"] > 0 and compiled["compiled"]["pretrain"]["total_ms"] > 0
    assert compiled["speedup"] > 0 and "cuda_graphs" not in compiled  # CUDA graphs only on CUDA

    ranks = figures["steps"]["ranks"]
    assert ranks["backend"] == "gloo" and ranks["gloo"]["identical"] is True and ranks["gloo"]["tensors"] > 100

    pretrain = figures["steps"]["pretrain"]
    assert pretrain["frames"] > 0 and pretrain["updates"] > 0 and pretrain["stopped_at_time_limit"]
    assert pretrain["ratio"] > 0
    assert f"figures written to {out}" in done.stdout


def test_an_unknown_step_is_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown step.*warp"):
        device.run(["--quick", "--out", str(tmp_path / "f.json"), "--steps", "learner,warp"])
