"""The skill auto-encoder: nearest-code assignment, EMA codebook, code resampling, the loss."""

from __future__ import annotations

import io

import torch

from choreo.agents.choreographer.skills import SkillAutoEncoder, skill_loss
from choreo.agents.config import ChoreographerConfig


def make(num_codes: int = 8, code_dim: int = 3, deter: int = 12, seed: int = 0, **cfg) -> SkillAutoEncoder:
    config = ChoreographerConfig(num_codes=num_codes, code_dim=code_dim, **cfg)
    return SkillAutoEncoder(deter, config, units=16, layers=2, generator=torch.Generator().manual_seed(seed))


def test_construction_is_seeded_and_codebook_uniform():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.codebook, c.codebook)
    assert not torch.equal(a.encoder.net[0].weight, c.encoder.net[0].weight)
    assert a.codebook.shape == (8, 3) and 0 <= a.codebook.min() and a.codebook.max() < 1
    assert torch.equal(a.embed_avg, a.codebook) and torch.equal(a.cluster_size, torch.ones(8))
    assert "codebook" not in dict(a.named_parameters())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in a.encoder.modules())


def test_nearest_code_on_hand_made_codes():
    sae = make(num_codes=4, code_dim=2)
    sae.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 1.0], [9.0, 2.0], [-3.0, 8.0], [6.0, 6.0], [4.9, 0.0], [5.1, 0.0]])
    assert sae.nearest(z).tolist() == [0, 1, 2, 3, 0, 1]
    sae.codebook[2] = sae.codebook[1]  # ties go to the lowest index
    assert sae.nearest(torch.tensor([[10.0, 0.0]])).tolist() == [1]


def test_quantize_straight_through_and_code_lookups():
    sae = make(num_codes=4, code_dim=2)
    sae.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 1.0], [9.0, 2.0]], requires_grad=True)
    z_q, idx = sae.quantize(z)
    assert idx.tolist() == [0, 1]
    torch.testing.assert_close(z_q, sae.codebook[idx])
    (z_q * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # identity gradient
    one_hot = torch.nn.functional.one_hot(torch.tensor([3, 1, 1]), 4).float()
    torch.testing.assert_close(sae.code_vectors(one_hot), sae.codebook[[3, 1, 1]])
    torch.testing.assert_close(sae.decode_code(one_hot), sae.decode_code(torch.tensor([3, 1, 1])))
    assert sae.decode_code(torch.tensor([3, 1, 1])).shape == (3, 12)


def test_ema_update_matches_hand_computation():
    sae = make(num_codes=3, code_dim=2, ema_decay=0.9)
    sae.codebook.copy_(torch.tensor([[0.0, 0.0], [4.0, 4.0], [9.0, 9.0]]))
    sae.embed_avg.copy_(torch.tensor([[0.0, 0.0], [8.0, 8.0], [9.0, 9.0]]))
    sae.cluster_size.copy_(torch.tensor([1.0, 2.0, 1.0]))
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    idx = torch.tensor([0, 0, 1])
    sae.ema_update(z, idx)
    cs = torch.tensor([0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 1, 0.9 * 1])
    ea = torch.tensor([[0.1 * 4, 0.1 * 2], [0.9 * 8 + 0.1 * 5] * 2, [0.9 * 9] * 2])
    n, eps = cs.sum(), 1e-5
    smoothed = (cs + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(sae.cluster_size, cs)
    torch.testing.assert_close(sae.embed_avg, ea)
    torch.testing.assert_close(sae.codebook, ea / smoothed[:, None])
    # Code 0 (mass 1 at the origin) moved 2/11 of the way to its batch mean (2, 1).
    torch.testing.assert_close(sae.codebook[0], torch.tensor([2.0, 1.0]) * 0.2 / 1.1, rtol=1e-4, atol=0)
    # An unassigned code keeps its place: its sum and its size decay together.
    torch.testing.assert_close(sae.codebook[2], torch.tensor([9.0, 9.0]), rtol=1e-4, atol=0)
    assert sae.usage.tolist() == [2, 1, 0]


def test_resampling_replaces_unused_codes_in_order_with_consistent_statistics():
    sae = make(num_codes=4, code_dim=2, resample_every=3)
    sae.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [100.0, 100.0]]))
    sae.embed_avg.copy_(sae.codebook)
    z = torch.tensor([[0.0, 0.1], [1.0, 0.1], [0.0, 0.0], [1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        sae.ema_update(z, sae.nearest(z))
        assert sae.maybe_resample(z, g) == 0 and sae.usage.tolist() == [2 * (step + 1), 2 * (step + 1), 0, 0]
    sae.codebook[:2] = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # pin the used codes for the check
    sae.ema_update(z, sae.nearest(z))
    assert sae.maybe_resample(z, g) == 2
    assert int(sae.updates) == 3 and sae.usage.tolist() == [0, 0, 0, 0]
    # Points at distance 0 from a code are never drawn; a point is not drawn twice.
    assert {tuple(row) for row in sae.codebook[2:].tolist()} == {tuple(row) for row in z[:2].tolist()}
    torch.testing.assert_close(sae.embed_avg[2:], sae.codebook[2:])
    torch.testing.assert_close(sae.cluster_size[2:], torch.ones(2))


def test_resample_every_zero_never_resamples():
    sae = make(num_codes=4, code_dim=2, resample_every=0)
    z = torch.zeros(5, 2)
    for _ in range(5):
        sae.ema_update(z, sae.nearest(z))
        assert sae.maybe_resample(z, torch.Generator()) == 0
    assert int(sae.updates) == 5 and int(sae.usage.sum()) == 25


def test_checks_without_resample_codes_count_windows_and_replace_nothing():
    sae = make(num_codes=4, code_dim=2, resample_every=2, resample_codes=False)
    z = torch.zeros(5, 2)
    codebook = sae.codebook.clone()
    for step in range(4):
        metrics = sae.codebook_step(z, sae.nearest(z), torch.Generator())
        assert metrics["codebook/resampled_codes"] == 0
        # the window holds this step and, between checks, the one before
        assert metrics["codebook/window_active_codes"] == 1
        assert int(sae.usage.sum()) == (0 if step % 2 == 1 else 5)
    dead = sae.usage.new_ones(4, dtype=torch.bool)
    dead[sae.nearest(z)[0]] = False
    torch.testing.assert_close(sae.codebook[dead], codebook[dead], rtol=1e-3, atol=0)  # unchosen codes stay put


def test_skill_loss_terms_metrics_and_gradients():
    sae = make(num_codes=8, code_dim=3, deter=12, commitment=0.25)
    deter = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss, metrics, aux = skill_loss(sae, deter)
    z_e = sae.encoder(deter.detach().reshape(10, 12))
    code = sae.codebook[sae.nearest(z_e)]
    recon = (sae.decoder(code) - deter.detach().reshape(10, 12)).square().mean()
    commit = (z_e - code).square().mean()
    torch.testing.assert_close(loss, recon + 0.25 * commit)
    assert set(metrics) == {"codebook/loss", "codebook/recon", "codebook/commitment", "codebook/perplexity",
                            "codebook/active_codes"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    active = len(aux["indices"].unique())
    assert metrics["codebook/active_codes"] == active and 1 <= metrics["codebook/perplexity"] <= active + 1e-4
    torch.testing.assert_close(aux["z_e"], z_e.detach())
    loss.backward()
    assert deter.grad is None  # the skill loss does not train the world model
    assert sae.encoder.net[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert sae.decoder.net[0].weight.grad.abs().sum() > 0


def clustered_run(resample_every: int, steps: int = 300, seed: int = 0) -> tuple[int, int]:
    """Paper Figure 7 in miniature: 64 well-separated clusters fed directly as embeddings, and a
    collapsed codebook (64 identical codes far from the data, so only code 0 is ever chosen).
    Returns (distinct codes chosen over an evaluation sample of every cluster, codes active in
    the last resampling window)."""
    sae = make(num_codes=64, code_dim=4, seed=seed, resample_every=resample_every)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, 4, generator=g) * 10.0
    sae.codebook.fill_(50.0)
    sae.embed_avg.fill_(50.0)
    window_active = 0
    for _ in range(steps):
        ids = torch.randint(0, 64, (512,), generator=g)
        z_e = centres[ids] + 0.1 * torch.randn(512, 4, generator=g)
        metrics = sae.codebook_step(z_e, sae.nearest(z_e), g)
        window_active = int(metrics["codebook/window_active_codes"])
    ids = torch.arange(64).repeat(20)
    z_e = centres[ids] + 0.1 * torch.randn(len(ids), 4, generator=g)
    return len(sae.nearest(z_e).unique()), window_active


def test_code_resampling_revives_a_collapsed_codebook():
    used, window_active = clustered_run(resample_every=50)
    assert used >= 61 and window_active >= 61
    assert clustered_run(resample_every=50) == (used, window_active)  # seeded, deterministic
    used_off, _ = clustered_run(resample_every=0)
    assert used_off < 32


def test_state_dict_round_trip_gives_same_outputs_and_same_next_resampling():
    sae = make(num_codes=16, code_dim=3, resample_every=2)
    g = torch.Generator().manual_seed(3)
    deter = torch.randn(64, 12, generator=g)
    _, _, aux = skill_loss(sae, deter)
    sae.codebook_step(aux["z_e"], aux["indices"], g)  # one update: buffers away from their start

    buffer = io.BytesIO()
    torch.save(sae.state_dict(), buffer)
    buffer.seek(0)
    restored = make(num_codes=16, code_dim=3, resample_every=2, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(dict(restored.named_buffers())) == {"codebook", "embed_avg", "cluster_size", "usage", "updates"}

    loss_a, metrics_a, aux_a = skill_loss(sae, deter)
    loss_b, metrics_b, aux_b = skill_loss(restored, deter)
    assert torch.equal(loss_a, loss_b) and torch.equal(aux_a["indices"], aux_b["indices"])
    assert torch.equal(sae.decode_code(torch.arange(16)), restored.decode_code(torch.arange(16)))
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out_a = sae.codebook_step(aux_a["z_e"], aux_a["indices"], ga)
    out_b = restored.codebook_step(aux_b["z_e"], aux_b["indices"], gb)
    assert out_a["codebook/resampled_codes"] > 0
    assert all(torch.equal(out_a[key], out_b[key]) for key in out_a)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
