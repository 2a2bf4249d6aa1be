"""The k-NN particle reward (exact, chunked), the code reward and the running magnitude."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from choreo.agents.choreographer.rewards import RunningMagnitude, _row_smallest, code_reward, knn_particle_reward


def brute_force(x: torch.Tensor, k: int, clip: float) -> torch.Tensor:
    """The reference's estimator with the full distance matrix, in float64, exact differences."""
    x = x.double()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # [N, N]
    nearest = dist.topk(min(k, x.shape[0]), dim=1, largest=False).values
    return (nearest - clip).clamp_min(0).mean(1)


def points(n: int, d: int, seed: int, duplicates: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + 3.0  # off-centre, as states are
    if duplicates:
        x[5:40] = x[0]  # 36 copies of one point: more than k of them
        x[50:53] = x[60]
    return x


@pytest.mark.parametrize(
    "n, d, k, chunk, duplicates",
    [
        (100, 5, 7, 33, False),  # chunk does not divide N
        (257, 16, 30, 64, False),
        (300, 64, 30, 7, True),  # chunk < k, duplicates
        (50, 3, 10, 1000, False),  # chunk > N
        (40, 4, 60, 16, False),  # k > N: every point is a neighbour
        (128, 200, 30, 128, True),  # one chunk, paper's D
        (3001, 12, 30, 700, True),  # long rows: selection through group minima, with a tail
    ],
)
def test_chunked_knn_equals_brute_force(n, d, k, chunk, duplicates):
    x = points(n, d, seed=n + d, duplicates=duplicates)
    expected = brute_force(x, k, clip=1e-4)
    got = knn_particle_reward(x, k, clip=1e-4, chunk=chunk)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k", [(5000, 30), (4007, 30), (2000, 7), (300, 30)])
def test_row_selection_equals_topk(n, k):
    g = torch.Generator().manual_seed(n)
    d2 = torch.randn(64, n, generator=g)
    d2[:8] = torch.randint(0, 50, (8, n), generator=g).float()  # many ties
    d2[8, : n // 2] = -1.0  # the k smallest all in one place
    val, idx = _row_smallest(d2, k)
    expected = d2.topk(k, dim=1, largest=False).values
    assert torch.equal(val.sort(1).values, expected)
    assert torch.equal(d2.gather(1, idx), val)
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct columns


def test_float64_input_is_computed_in_float64():
    x = points(200, 12, seed=3).double()
    got = knn_particle_reward(x, 10, clip=0.0, chunk=64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, brute_force(x, 10, clip=0.0), rtol=1e-12, atol=1e-12)


def test_self_and_duplicates_are_at_distance_zero():
    x = points(300, 64, seed=1, duplicates=True) * 10.0  # large |x|^2: the expansion cancels badly
    # k = 1: the only neighbour is the point itself.
    assert torch.equal(knn_particle_reward(x, 1, clip=0.0, chunk=50), torch.zeros(300))
    # 36 identical points and k = 30: all neighbours are copies.
    assert torch.equal(knn_particle_reward(x, 30, clip=0.0, chunk=50)[5:40], torch.zeros(35))


def test_clip_is_subtracted_per_neighbour():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    # neighbours of 0: itself (0) and 1 (distance 1) -> mean(max(0 - .5, 0), max(1 - .5, 0)) = .25
    got = knn_particle_reward(x, 2, clip=0.5, chunk=2)
    torch.testing.assert_close(got, torch.tensor([0.25, 0.25, 0.75]))


@pytest.mark.parametrize("data", ["rollouts", "clusters"])
def test_bf16_is_close_to_exact(data):
    """bfloat16 only selects candidates (2k of them); their distances are recomputed in float32.
    Stated tolerance: 1e-4 relative per point (measured: ~1e-6 on these and at the paper's size)."""
    g = torch.Generator().manual_seed(0)
    if data == "rollouts":  # 64 starts x 16 steps of a random walk, squashed like deter
        walk = torch.randn(64, 1, 32, generator=g) + 0.1 * torch.randn(64, 16, 32, generator=g).cumsum(1)
        x = walk.tanh().reshape(-1, 32)
    else:  # 16 tight clusters of 64 points: many near-equal distances
        x = (torch.randn(16, 1, 32, generator=g) + 0.2 * torch.randn(16, 64, 32, generator=g)).tanh().reshape(-1, 32)
    exact = knn_particle_reward(x, 30, chunk=256)
    approx = knn_particle_reward(x, 30, chunk=256, bf16=True)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-6)


def test_reward_is_detached():
    x = points(64, 8, seed=2).requires_grad_()
    assert not knn_particle_reward(x, 5, chunk=16).requires_grad


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (in elements) any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("bf16", [False, True])
def test_memory_is_chunk_by_n_never_n_by_n(bf16):
    n, d, chunk = 20_000, 8, 1024
    x = points(n, d, seed=4)
    with LargestStorage() as monitor:
        got = knn_particle_reward(x, 30, chunk=chunk, bf16=bf16)
    assert monitor.largest <= chunk * n  # the reused distance buffer
    assert monitor.largest < n * n // 10
    rows = torch.arange(0, n, 997)
    dist = torch.cdist(x[rows].double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    expected = (dist.topk(30, dim=1, largest=False).values - 1e-4).clamp_min(0).mean(1)
    torch.testing.assert_close(got[rows].double(), expected, rtol=1e-4, atol=1e-5)


def test_code_reward_is_minus_l2_norm_with_gradient_wrt_deter():
    g = torch.Generator().manual_seed(5)
    decoded = torch.randn(4, 6, 10, generator=g)
    deter = torch.randn(4, 6, 10, generator=g, requires_grad=True)
    reward = code_reward(decoded, deter)
    assert reward.shape == (4, 6)
    torch.testing.assert_close(reward, -(decoded - deter).square().sum(-1).sqrt())
    reward.sum().backward()
    diff = (decoded - deter).detach()
    torch.testing.assert_close(deter.grad, diff / diff.norm(dim=-1, keepdim=True))


def test_running_magnitude_hand_computed_and_checkpointed():
    norm = RunningMagnitude(momentum=0.9)
    r1, r2 = torch.tensor([2.0, -4.0]), torch.tensor([1.0, 1.0])
    mag1 = 0.9 * 1.0 + 0.1 * 3.0
    torch.testing.assert_close(norm(r1), r1 / (mag1 + 1e-8))
    mag2 = 0.9 * mag1 + 0.1 * 1.0
    torch.testing.assert_close(norm(r2), r2 / (mag2 + 1e-8))
    restored = RunningMagnitude(momentum=0.9)
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored.mag, torch.tensor(mag2))
    torch.testing.assert_close(restored(r1, update=False), r1 / (mag2 + 1e-8))


def test_running_magnitude_momentum_one_is_a_no_op():
    norm = RunningMagnitude(momentum=1.0)
    r = torch.tensor([5.0, -3.0], requires_grad=True)
    assert norm(r) is r
    assert float(norm.mag) == 1.0
