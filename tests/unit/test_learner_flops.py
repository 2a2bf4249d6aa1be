"""The operations `choreo bench learner` counts per part of an update, and its table's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from choreo.agents.timing import PartTimer
from choreo.launch.bench.learner import count_flops, flop_table, machine_rates


def test_parts_count_their_own_products_and_a_nested_part_counts_in_its_parent():
    timer = PartTimer()
    a, b, c = torch.randn(5, 8), torch.randn(8, 4), torch.randn(4, 3)
    counter = FlopCounterMode(display=False)
    with counter, timer.counting(counter):
        with timer("outer"):
            x = a @ b  # 2 * 5 * 8 * 4 = 320
            with timer("inner"):
                x @ c  # 2 * 5 * 4 * 3 = 120
        with timer("other"):
            a @ b
        a @ b  # outside every part: only in the total
    assert timer.flops() == {"outer": 440, "inner": 120, "other": 320}
    assert counter.get_total_flops() == 440 + 320 + 320
    timer.reset()
    assert timer.flops() == {}


def test_without_a_counter_parts_are_timed_only():
    timer = PartTimer()
    with timer("part"):
        torch.randn(3, 3) @ torch.randn(3, 3)
    assert timer.flops() == {}
    assert set(timer.metrics()) == {"time/part_s"}


def test_the_table_gives_each_part_its_rate_and_its_fraction_of_the_matmul_rate():
    timed = {"total_ms": 1000.0, "world_model_ms": 500.0, "skill_actor_critic_ms": 400.0, "knn_reward_ms": 100.0}
    flops = {"world_model": 50.0, "skill_actor_critic": 20.0, "knn_reward": 10.0, "total": 80.0}
    lines = flop_table("pretrain", timed, flops, {"matmul_fp32_gflops": 200.0}, "fp32")
    rows = {line.split()[0] if not line.strip().startswith("of which") else "knn_reward": line.split()
            for line in lines[1:]}
    assert rows["world_model"][-3:] == ["50.00", "100.0", "50%"]  # 50 GFLOP in 0.5 s of 200 GFLOP/s
    assert rows["skill_actor_critic"][-3:] == ["20.00", "50.0", "25%"]
    assert rows["knn_reward"][-3:] == ["10.00", "100.0", "50%"]
    assert rows["whole"][-3:] == ["80.00", "80.0", "40%"]
    # The nested part comes right after its parent, and a part never counted shows dashes.
    assert [line.split()[0] for line in lines[1:4]] == ["world_model", "skill_actor_critic", "of"]
    lines = flop_table("finetune", {"total_ms": 10.0, "meta_controller_ms": 5.0}, {"total": 1.0},
                       {"matmul_bf16_gflops": 100.0}, "bf16")
    assert "of bf16 matmul" in lines[0] and lines[1].split()[1:] == ["5", "-", "-", "-"]


def test_an_update_counted_gives_every_part_and_the_parts_add_up_to_at_most_the_total():
    from choreo.agents.registry import make_agent
    from choreo.launch.runtime.build import random_batch
    from choreo.launch.runtime.config import load_config

    config = load_config(["states", "tiny"], [])
    agent = make_agent("choreographer", (24,), 6, config.agent, seed=0, device="cpu", profile=True)
    rb = config.replay
    batch = random_batch(np.random.default_rng(0), (24,), rb.batch_size, rb.batch_length)
    counted = count_flops(agent, batch)
    top = ("world_model", "exploration", "skill_autoencoder", "skill_actor_critic")
    assert all(counted[name] > 0 for name in (*top, "knn_reward"))
    assert sum(counted[name] for name in top) <= counted["total"] + 1e-9
    assert counted["knn_reward"] < counted["skill_actor_critic"]
    # The k-NN reward's products: one [N, D] x [D, N] matmul, N = batch x (horizon + 1) imagined states.
    n = rb.batch_size * rb.batch_length * (config.agent.actor_critic.horizon + 1)
    assert counted["knn_reward"] * 1e9 == pytest.approx(2 * n * n * config.agent.world_model.deter)
    assert agent.timer.counter is None  # the counter is gone once the update is counted


def test_the_machines_rates_are_measured():
    rates = machine_rates(torch.device("cpu"), repeat=1, n=128, elements=1 << 16)
    assert set(rates) == {"matmul_fp32_gflops", "matmul_bf16_gflops", "copy_gbs"}
    assert all(v > 0 for v in rates.values())
