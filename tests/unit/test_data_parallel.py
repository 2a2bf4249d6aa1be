"""Several learners train one agent: two ranks over gloo, in two spawned processes (no Ray; the
tests that spawn carry the `slow` marker).

Each test starts a process group of two ranks on loopback, runs a function on both, and compares
what they wrote. The invariants: the ranks' states stay bit-identical, whatever happens on one
rank only (a NaN in its batch, the reward that opens the gate, the dead codes it sees); and two
ranks on two halves of a batch do what one process does on the whole batch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from choreo import vocabulary as B
from choreo.agents.actor_critic import Optimizer
from choreo.agents.collective import SOLO
from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.rewards import RunningMagnitude, knn_particle_reward
from choreo.agents.choreographer.skills import SkillAutoEncoder
from choreo.launch.runtime.build import random_batch
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.runtime.distributed import state_digest
from choreo.learner.dist import free_port, join_group, leave_group, rank_device

WORLD = 2
SPAWNS = pytest.mark.slow  # each test starts two Python processes (a few seconds each)


def run_ranks(fn, tmp_path: Path, *args) -> list:
    """Runs fn(collective, out_dir, *args) on WORLD ranks; returns what each returned, by rank
    (JSON-serialisable results, written to `tmp_path`)."""
    address = f"127.0.0.1:{free_port()}"
    mp.spawn(_rank_main, args=(fn, address, str(tmp_path), args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _rank_main(rank: int, fn, address: str, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    collective = join_group(rank, WORLD, address, torch.device("cpu"), timeout_s=60)
    try:
        result = fn(collective, *args)
    finally:
        leave_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def tiny_agent_config(*overrides: str):
    return load_config(["tiny"], list(overrides)).agent


# ---------------------------------------------------------------------------- the whole agent


def _agent_updates(collective, overrides: list[str], finetune: bool) -> dict:
    """A few updates on this rank's own batches, with one-rank-only events: rank 1's batch holds a
    NaN at update 1 and (fine-tuning) the only reward at update 2."""
    cfg = tiny_agent_config(*overrides)
    agent = ChoreographerAgent((24,), 6, cfg, seed=0, device="cpu", collective=collective)
    if finetune:
        agent.start_finetuning(None)
    digests, nonfinite, gate, resampled = [], [], [], []
    for i in range(5):
        batch = random_batch(np.random.default_rng(100 * collective.rank + i), (24,), 3, 6)
        if i == 1 and collective.rank == 1:
            batch[B.OBSERVATION][0, 2, 0] = np.nan
        if finetune and i == 2 and collective.rank == 1:
            batch[B.REWARD][1, 3] = 1.0
        metrics = agent.update(batch)
        nonfinite.append(metrics["learner/nonfinite"])
        gate.append(metrics.get("meta/gate_open"))
        resampled.append(metrics.get("codebook/resampled_codes"))
        digests.append(state_digest({k: v for k, v in agent.state_dict().items() if k != "_extra_state"}
                                    | {"opt": _optimizer_states(agent)}))
    return {"digests": digests, "nonfinite": nonfinite, "gate": gate, "resampled": resampled,
            "generator": agent.generator.get_state().tolist()[:64], "updates": int(agent.updates)}


def _optimizer_states(agent: ChoreographerAgent) -> dict:
    extra = agent.get_extra_state()
    extra.pop("generator")  # the one state that differs between ranks, by design
    return extra


@SPAWNS
@pytest.mark.parametrize("pool", ["rank", "global"])
def test_ranks_stay_identical_through_nan_and_resampling(tmp_path, pool):
    ranks = run_ranks(_agent_updates, tmp_path, ["agent.choreographer.resample_every=2",
                                                 f"agent.choreographer.knn_pool={pool}"], False)
    a, b = ranks
    assert a["digests"] == b["digests"], "the ranks' parameters, buffers or optimizer states drifted apart"
    assert len(set(a["digests"])) == 5, "every update changed the state (the NaN update only the counters)"
    assert a["nonfinite"][1] == b["nonfinite"][1] == 1.0, "rank 1's NaN must make both ranks skip"
    assert a["nonfinite"][0] == a["nonfinite"][2] == 0.0
    assert a["resampled"] == b["resampled"] and any(r > 0 for r in a["resampled"]), "no resampling happened"
    assert a["updates"] == b["updates"] == 4, "the skipped update is not counted, on either rank"
    assert a["generator"] != b["generator"], "each rank draws its own imagination noise"


@SPAWNS
def test_gate_opened_by_one_rank_opens_for_all(tmp_path):
    a, b = run_ranks(_agent_updates, tmp_path, [], True)
    assert a["digests"] == b["digests"]
    assert a["gate"] == b["gate"] == [0.0, 0.0, 1.0, 1.0, 1.0], "only rank 1 saw the reward, at update 2"


# ---------------------------------------------------------------------------- against one process


def _optimizer_half(collective, rows: list) -> dict:
    model = _linear()
    opt = Optimizer(model.parameters(), lr=1e-2, eps=1e-5, grad_clip=0.5, weight_decay=1e-3, collective=collective)
    x = torch.tensor(rows, dtype=torch.float32)
    for _ in range(3):
        metrics = opt.step(model(x).square().mean())
    return {"params": [p.detach().tolist() for p in model.parameters()], "norm": float(metrics["optimizer/grad_norm"])}


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


@SPAWNS
def test_optimizer_on_two_halves_matches_one_step_on_the_batch(tmp_path):
    batch = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model = _linear()
    opt = Optimizer(model.parameters(), lr=1e-2, eps=1e-5, grad_clip=0.5, weight_decay=1e-3)
    for _ in range(3):
        metrics = opt.step(model(torch.from_numpy(batch)).square().mean())
    single = [p.detach().numpy() for p in model.parameters()]

    def half(rank):
        return batch[rank * 4:(rank + 1) * 4].tolist()

    results = _spawn_per_rank(tmp_path, _optimizer_half, [half(0), half(1)])
    for r in results:
        for got, want in zip(r["params"], single):
            np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
        assert r["norm"] == pytest.approx(float(metrics["optimizer/grad_norm"]), rel=1e-5)
    assert results[0] == results[1]


def _spawn_per_rank(tmp_path: Path, fn, per_rank: list) -> list:
    """run_ranks with a different argument on each rank."""
    return run_ranks(_per_rank, tmp_path, fn.__name__, per_rank)


def _per_rank(collective, name: str, per_rank: list):
    return globals()[name](collective, per_rank[collective.rank])


def _codebook_half(collective, arrays: dict) -> dict:
    sae = _sae(collective)
    z = torch.tensor(arrays["z"])
    sae.usage.copy_(torch.tensor(arrays["usage"]))
    sae.updates.fill_(sae.cfg.resample_every - 1)  # this step is a check
    metrics = sae.codebook_step(z, sae.nearest(z), torch.Generator().manual_seed(7))
    return {"codebook": sae.codebook.tolist(), "cluster_size": sae.cluster_size.tolist(),
            "usage": sae.usage.tolist(), "resampled": float(metrics["codebook/resampled_codes"])}


def _sae(collective=None):
    cfg = load_config(["tiny"]).agent.choreographer
    kwargs = {"collective": collective} if collective is not None else {}
    return SkillAutoEncoder(8, cfg, units=16, layers=1, generator=torch.Generator().manual_seed(0), **kwargs)


@SPAWNS
def test_codebook_and_resampling_on_two_halves_match_the_whole_batch(tmp_path):
    sae = _sae()
    k, c = sae.num_codes, sae.code_dim
    rng = np.random.default_rng(1)
    z = (sae.codebook[:3].numpy()[rng.integers(0, 3, 40)] + 0.05 * rng.standard_normal((40, c))).astype(np.float32)
    usage = np.zeros(k, np.int64)  # every code the batch does not choose is dead at this check
    single = _codebook_half(SOLO, {"z": z.tolist(), "usage": usage.tolist()})
    halves = [{"z": z[:20].tolist(), "usage": usage.tolist()}, {"z": z[20:].tolist(), "usage": usage.tolist()}]
    a, b = _spawn_per_rank(tmp_path, _codebook_half, halves)
    assert a == b
    assert a["resampled"] == single["resampled"] > 0
    np.testing.assert_allclose(a["cluster_size"], single["cluster_size"], rtol=1e-6)
    np.testing.assert_allclose(a["codebook"], single["codebook"], rtol=1e-5, atol=1e-6)


def _magnitude_and_knn(collective, arrays: dict) -> dict:
    norm = RunningMagnitude(0.5, collective=collective)
    norm(torch.tensor(arrays["r"]))
    x = torch.tensor(arrays["x"])
    n = x.shape[0]
    pool = collective.gather(x)
    reward = knn_particle_reward(pool, 3, rows=(collective.rank * n, (collective.rank + 1) * n))
    return {"mag": float(norm.mag), "knn": reward.tolist()}


@SPAWNS
def test_running_magnitude_and_global_knn_match_one_process(tmp_path):
    rng = np.random.default_rng(2)
    r = rng.standard_normal(16).astype(np.float32)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    norm = RunningMagnitude(0.5)
    norm(torch.from_numpy(r))
    knn = knn_particle_reward(torch.from_numpy(x), 3)
    a, b = _spawn_per_rank(tmp_path, _magnitude_and_knn, [{"r": r[:8].tolist(), "x": x[:6].tolist()},
                                                        {"r": r[8:].tolist(), "x": x[6:].tolist()}])
    assert a["mag"] == b["mag"] == pytest.approx(float(norm.mag), rel=1e-6)
    np.testing.assert_allclose(a["knn"] + b["knn"], knn.numpy(), rtol=1e-5)


def test_knn_rows_score_a_slice_against_the_whole_pool():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    whole = knn_particle_reward(x, 5, chunk=7)
    np.testing.assert_allclose(knn_particle_reward(x, 5, chunk=7, rows=(10, 31)), whole[10:31], rtol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        knn_particle_reward(x, 5, rows=(40, 60))


# ---------------------------------------------------------------------------- settings


def test_learner_group_settings_are_checked():
    with pytest.raises(ConfigError, match="learner.num_learners"):
        load_config(["tiny"], ["learner.num_learners=0"])
    with pytest.raises(ConfigError, match="learner.group_timeout_s"):
        load_config(["tiny"], ["learner.num_learners=2", "learner.group_timeout_s=0"])
    with pytest.raises(ConfigError, match="algo=dads"):
        load_config(["tiny"], ["algo=dads", "learner.num_learners=2"])
    with pytest.raises(ConfigError, match="replay.batch_size"):
        load_config(["tiny"], ["learner.num_learners=2", "learner.scaling=strong", "replay.batch_size=3"])
    # strong scaling splits the batch: each rank's k-NN pool alone would not be the paper's
    with pytest.raises(ConfigError, match=r"'learner.scaling' and 'agent.choreographer.knn_pool'.*knn_pool=global"):
        load_config(["tiny"], ["learner.num_learners=2", "learner.scaling=strong", "replay.batch_size=4"])
    load_config(["tiny"], ["learner.num_learners=2", "learner.scaling=strong", "replay.batch_size=4",
                           "agent.choreographer.knn_pool=global"])
    load_config(["tiny"], ["learner.scaling=strong"])  # one learner: nothing is split
    with pytest.raises(ConfigError, match="learner.gpus_per_learner.*NCCL refuses two ranks on one GPU"):
        load_config(["tiny"], ["learner.num_learners=2", "learner.gpus_per_learner=0.5"])
    with pytest.raises(ConfigError, match="learner.gpus_per_learner.*learner.device=cuda"):
        load_config(["tiny"], ["learner.num_learners=2", "learner.gpus_per_learner=0", "learner.device=cuda"])
    # On CPUs a share of a GPU is irrelevant, and one learner takes the whole path of old.
    load_config(["tiny"], ["learner.num_learners=2", "learner.gpus_per_learner=0.5", "learner.device=cpu"])
    load_config(["tiny"], ["learner.gpus_per_learner=0.5"])


def test_a_gpu_rank_binds_its_own_gpu_among_the_visible_ones():
    assert rank_device(["3"], None) == torch.device("cuda", 3)  # every GPU visible: CUDA's number is Ray's id
    assert rank_device([3], "") == torch.device("cuda", 3)
    # The node lists its GPUs: CUDA numbers them in the listed order.
    assert rank_device(["5"], "4,5,6") == torch.device("cuda", 1)
    assert rank_device(["4", "6"], "6, 4") == torch.device("cuda", 1)  # a rank trains on its first GPU
    with pytest.raises(RuntimeError, match="GPU 2 is not among CUDA_VISIBLE_DEVICES=0,1"):
        rank_device(["2"], "0,1")
    with pytest.raises(RuntimeError, match="learner.gpus_per_learner=0"):
        rank_device([], None)


def test_weak_scaling_multiplies_learning_rates_by_sqrt_world():
    from choreo.launch.runtime.build import group_agent_config
    from choreo.launch.runtime.config import group_batch_size, rank_batch_size

    one = load_config(["tiny"])
    weak = load_config(["tiny"], ["learner.num_learners=4"])
    strong = load_config(["tiny"], ["learner.num_learners=2", "learner.scaling=strong", "replay.batch_size=4",
                                    "agent.choreographer.knn_pool=global"])
    assert group_agent_config(one) is one.agent
    assert group_agent_config(weak).world_model.lr == pytest.approx(2 * one.agent.world_model.lr)
    assert group_agent_config(weak).choreographer.skill_lr == pytest.approx(2 * one.agent.choreographer.skill_lr)
    assert group_agent_config(strong).actor_critic.actor_lr == one.agent.actor_critic.actor_lr
    assert (rank_batch_size(weak), group_batch_size(weak)) == (one.replay.batch_size, 4 * one.replay.batch_size)
    assert (rank_batch_size(strong), group_batch_size(strong)) == (2, 4)


class _OtherRank(SOLO.__class__):
    """A stand-in group of two for one process: the other rank holds `other`, a module of the same shapes."""

    world = 2

    def __init__(self, other: torch.nn.Module) -> None:
        self.other = other

    def gather(self, tensor):
        from choreo.learner.learner import tensor_digests

        return torch.cat([tensor, torch.tensor(tensor_digests(self.other)[1], dtype=tensor.dtype)])


def test_learner_stops_naming_the_first_tensor_the_ranks_disagree_on(tmp_path):
    from choreo.learner.config import LearnerConfig
    from choreo.learner.learner import Learner, tensor_digests

    cfg = tiny_agent_config()
    mine, other = (ChoreographerAgent((24,), 6, cfg, seed=0, device="cpu") for _ in range(2))
    names, digests = tensor_digests(mine)
    assert digests == tensor_digests(other)[1]
    # every parameter and buffer: the codebook, its EMA sums and counts, usage, the exploration
    # reward's magnitude, the gate, the counters
    buffers = [name for name, _ in mine.named_buffers()]
    assert set(buffers) <= set(names) and {n for n, _ in mine.named_parameters()} <= set(names)
    for part in ("codebook", "embed_avg", "cluster_size", "usage", "mag", "gate_open", "updates"):
        assert any(n.split(".")[-1] == part for n in buffers), part

    def check() -> None:
        Learner(mine, lambda: None, lambda w, v: None, LearnerConfig(), tmp_path, prefetch=0,
                collective=_OtherRank(other)).check_ranks_agree()

    check()
    usage = next(n for n in buffers if n.endswith("usage"))
    other.get_buffer(usage).add_(1)  # a count no gradient and no parameter sum sees
    with pytest.raises(RuntimeError, match=rf"drifted apart at update 0: 1 of {len(names)} tensors differ, "
                                           rf"the first '{re.escape(usage)}'"):
        check()
    other.get_buffer(usage).sub_(1)
    check()
    # two entries of a parameter swapped: its sum is the same, its digest is not
    name, param = next((n, p) for n, p in other.named_parameters()
                       if p.numel() > 1 and p.flatten()[0] != p.flatten()[1])
    with torch.no_grad():
        flat = param.view(-1)
        flat[[0, 1]] = flat[[1, 0]].clone()
    with pytest.raises(RuntimeError, match=rf"the first '{re.escape(name)}'"):
        check()
