"""Networks, distributions and the DreamerV2-style world model: shapes, resets, straight-through
sampling, KL balancing, learning, imagination."""

import math

import pytest
import torch

from choreo.vocabulary import ACTION, IS_FIRST, OBSERVATION, REWARD
from choreo.agents.config import WorldModelConfig
from choreo.agents.distributions import CodeCategorical, OneHotStraightThrough, TruncatedNormal
from choreo.agents.nets import MLP, ConvDecoder, ConvEncoder, LayerNormGRUCell, frozen
from choreo.agents.world_model import (
    State,
    WorldModel,
    build_encoder,
    imagine,
    kl_balance_loss,
    preprocess_observation,
    world_model_loss,
)

TINY = WorldModelConfig(deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2, cnn_depth=4)
FEAT = 4 * 4 + 32


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_batch(obs_shape, batch=3, length=6, action_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if len(obs_shape) == 1:
        obs = torch.randn(batch, length, *obs_shape, generator=g)
    else:
        obs = torch.randint(0, 256, (batch, length, *obs_shape), generator=g, dtype=torch.uint8)
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    return {
        OBSERVATION: obs,
        ACTION: torch.rand(batch, length, action_dim, generator=g) * 2 - 1,
        REWARD: torch.randn(batch, length, generator=g),
        IS_FIRST: is_first,
    }


# ---- networks -------------------------------------------------------------------------------


def test_conv_encoder_and_decoder_sizes_at_depth_48():
    encoder = ConvEncoder(48)
    assert encoder(torch.zeros(2, 5, 3, 64, 64)).shape == (2, 5, 1536) and encoder.out_dim == 1536
    decoder = ConvDecoder(1224, 48)
    assert decoder(torch.zeros(2, 5, 1224)).shape == (2, 5, 3, 64, 64)
    assert decoder(torch.zeros(7, 1224)).shape == (7, 3, 64, 64)


def test_parameter_counts_match_the_reference():
    """The reference's counts (walker states obs 24 / pixels, action 6) pin down the architecture."""
    states = WorldModel((24,), 6, WorldModelConfig())
    assert n_params(states.encoder) == 494_400
    assert n_params(states.rssm) == 1_020_048
    assert n_params(states.decoder) == 984_024
    assert n_params(states.reward) == 971_601
    assert states.feat_dim == 1224
    pixels = WorldModel((3, 64, 64), 6, WorldModelConfig())
    assert n_params(pixels.encoder) == 1_551_312
    assert n_params(pixels.rssm) == 1_247_248
    assert n_params(pixels.decoder) == 9_886_611


def test_acting_side_builds_the_same_encoder():
    for shape in ((5,), (3, 64, 64)):
        wm = WorldModel(shape, 2, TINY)
        encoder = build_encoder(shape, TINY)
        encoder.load_state_dict(wm.encoder.state_dict())  # strict: same structure
        obs = make_batch(shape)[OBSERVATION]
        torch.testing.assert_close(encoder(preprocess_observation(obs, len(shape) == 3)), wm.encode(obs))


def test_mlp_with_and_without_output_layer():
    trunk = MLP(5, None, 16, 2, norm=True)
    assert trunk(torch.zeros(3, 4, 5)).shape == (3, 4, 16) and trunk.out_dim == 16
    assert any(isinstance(m, torch.nn.LayerNorm) for m in trunk.modules())
    head = MLP(5, 1, 16, 2, norm=False)
    assert head(torch.zeros(3, 5)).shape == (3, 1)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in head.modules())


def test_gru_cell_matches_its_equations():
    torch.manual_seed(0)
    cell = LayerNormGRUCell(3, 4)
    x, h = torch.randn(5, 3), torch.randn(5, 4)
    parts = cell.norm(cell.linear(torch.cat([x, h], -1)))
    r, c, u = parts[:, :4], parts[:, 4:8], parts[:, 8:]
    cand = torch.tanh(torch.sigmoid(r) * c)
    update = torch.sigmoid(u - 1)
    torch.testing.assert_close(cell(x, h), update * cand + (1 - update) * h)


def test_frozen_restores_flags_and_blocks_parameter_gradients():
    net = MLP(3, 1, 8, 1, norm=False)
    net.net[0].bias.requires_grad_(False)
    x = torch.randn(4, 3, requires_grad=True)
    with frozen(net):
        net(x).sum().backward()
    assert all(p.grad is None for p in net.parameters()) and x.grad is not None
    assert [p.requires_grad for p in net.parameters()] == [True, False, True, True]


# ---- distributions --------------------------------------------------------------------------


def test_straight_through_sample_is_one_hot_and_passes_gradients():
    logits = torch.randn(6, 4, 5, requires_grad=True)
    dist = OneHotStraightThrough(logits)
    sample = dist.sample(torch.Generator().manual_seed(1))
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(sample.sum(-1), torch.ones(6, 4))
    weights = torch.randn(6, 4, 5)
    (grad,) = torch.autograd.grad((sample * weights).sum(), logits)
    (expected,) = torch.autograd.grad((torch.softmax(logits, -1) * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_categorical_samples_follow_the_probabilities_and_are_seedable():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(20_000, 1, 4)
    a = OneHotStraightThrough(logits).sample(torch.Generator().manual_seed(3))
    b = OneHotStraightThrough(logits).sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    freq = a.mean((0, 1))
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    entropy = OneHotStraightThrough(logits[:1]).entropy()
    torch.testing.assert_close(entropy, torch.distributions.Categorical(probs=probs).entropy()[None])


def test_truncated_normal():
    out = torch.randn(1000, 6, requires_grad=True)
    dist = TruncatedNormal.from_output(out, min_std=0.1)
    torch.testing.assert_close(dist.mean, torch.tanh(out[:, :3]))
    torch.testing.assert_close(dist.std, 2 * torch.sigmoid(out[:, 3:] / 2) + 0.1)
    x = dist.sample(torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1 - 1e-6 and x.shape == (1000, 3)
    assert torch.equal(x, TruncatedNormal.from_output(out, 0.1).sample(torch.Generator().manual_seed(0)))
    (grad,) = torch.autograd.grad(x.sum(), out)  # reparameterised, clamp passes gradients
    assert torch.all(grad[:, :3] != 0) and grad[:, 3:].abs().sum() > 0
    normal = torch.distributions.Normal(dist.mean, dist.std)
    torch.testing.assert_close(dist.log_prob(x), normal.log_prob(x).sum(-1))
    torch.testing.assert_close(dist.entropy(), normal.entropy().sum(-1))
    assert torch.equal(dist.mode, dist.mean)


def test_code_categorical():
    logits = torch.randn(5, 8)
    dist = CodeCategorical(logits)
    ref = torch.distributions.Categorical(logits=logits)
    index = dist.sample_index(torch.Generator().manual_seed(0))
    one_hot = dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(one_hot.argmax(-1), index) and torch.equal(one_hot.sum(-1), torch.ones(5))
    torch.testing.assert_close(dist.log_prob(index), ref.log_prob(index))
    torch.testing.assert_close(dist.log_prob(one_hot), ref.log_prob(index))
    torch.testing.assert_close(dist.entropy(), ref.entropy())
    assert torch.equal(dist.mode.argmax(-1), logits.argmax(-1))


# ---- RSSM -----------------------------------------------------------------------------------


def test_state_helpers():
    s = State(torch.randn(2, 3, 5), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert s.shape == (2, 3)
    assert s.flatten().deter.shape == (6, 5) and s.flatten().stoch.shape == (6, 4, 4)
    assert s[:, 1].deter.shape == (2, 5) and torch.equal(s[:, 1].logits, s.logits[:, 1])
    stacked = State.stack([s, s], 1)
    assert stacked.shape == (2, 2, 3) and stacked.stoch.shape == (2, 2, 3, 4, 4)
    assert stacked.reshape(4, 3).shape == (4, 3)


@pytest.mark.parametrize("obs_shape", [(5,), (3, 64, 64)])
def test_world_model_loss_shapes(obs_shape):
    torch.manual_seed(0)
    wm = WorldModel(obs_shape, 2, TINY)
    batch = make_batch(obs_shape)
    loss, metrics, out = world_model_loss(wm, batch, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    assert out.feat.shape == (3, 6, FEAT) and wm.feat_dim == FEAT
    assert out.post.deter.shape == (3, 6, 32) and out.post.stoch.shape == (3, 6, 4, 4)
    assert out.prior.logits.shape == (3, 6, 4, 4)
    assert out.kl.shape == (3, 6) and not out.kl.requires_grad and torch.all(out.kl >= -1e-6)
    for key in ("loss", "kl", "obs_loss", "reward_loss", "prior_entropy", "post_entropy"):
        value = metrics[f"world_model/{key}"]
        assert value.shape == () and not value.requires_grad
    assert torch.all(out.post.stoch.sum(-1) == 1)
    assert set(out.post.stoch.unique().tolist()) <= {0.0, 1.0}


def test_observe_equals_repeated_obs_step():
    """The sequence filter (with its batched projections) computes what obs_step computes."""
    torch.manual_seed(0)
    wm = WorldModel((5,), 2, TINY)
    batch = make_batch((5,), length=7)
    batch[IS_FIRST][1, 4] = True  # a reset in the middle of one sequence
    embed = wm.encode(batch[OBSERVATION])
    post, prior = wm.rssm.observe(embed, batch[ACTION], batch[IS_FIRST])
    state = wm.rssm.initial(3)
    for t in range(7):
        p, q = wm.rssm.obs_step(state, batch[ACTION][:, t], embed[:, t], batch[IS_FIRST][:, t])
        torch.testing.assert_close(p.deter, post.deter[:, t])
        torch.testing.assert_close(p.logits, post.logits[:, t])
        torch.testing.assert_close(q.logits, prior.logits[:, t])
        state = post[:, t]  # continue from observe's own samples


def test_is_first_resets_state_and_action():
    torch.manual_seed(0)
    wm = WorldModel((5,), 2, TINY)
    rssm = wm.rssm
    embed = torch.randn(4, wm.encoder.out_dim)
    busy = State(torch.randn(4, 32), OneHotStraightThrough(torch.randn(4, 4, 4)).sample(), torch.randn(4, 4, 4))
    action = torch.rand(4, 2)
    is_first = torch.tensor([True, False, True, False])
    post, prior = rssm.obs_step(busy, action, embed, is_first, torch.Generator().manual_seed(5))
    fresh_post, fresh_prior = rssm.obs_step(rssm.initial(4), torch.zeros(4, 2), embed, None,
                                            torch.Generator().manual_seed(5))
    for a, b in ((post, fresh_post), (prior, fresh_prior)):
        torch.testing.assert_close(a.deter[is_first], b.deter[is_first])
        torch.testing.assert_close(a.logits[is_first], b.logits[is_first])
        assert not torch.allclose(a.deter[~is_first], b.deter[~is_first])
    assert torch.equal(rssm.initial(2).deter, torch.zeros(2, 32))
    assert torch.equal(rssm.feature(rssm.initial(2)), torch.zeros(2, FEAT))


# ---- loss -----------------------------------------------------------------------------------


def _kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.mark.parametrize("free", [0.1, 5.0])
def test_kl_balancing_on_a_hand_made_case(free):
    # two variables of two classes, a batch of one
    post_p = [[0.9, 0.1], [0.5, 0.5]]
    prior_p = [[0.5, 0.5], [0.2, 0.8]]
    post = torch.tensor(post_p).log()[None].requires_grad_(True)
    prior = torch.tensor(prior_p).log()[None].requires_grad_(True)
    loss, kl = kl_balance_loss(post, prior, balance=0.8, free=free)
    value = _kl_by_hand(post_p[0], prior_p[0]) + _kl_by_hand(post_p[1], prior_p[1])  # about 0.591
    torch.testing.assert_close(kl, torch.tensor([value]))
    torch.testing.assert_close(loss, torch.tensor(max(value, free)))
    loss.backward()
    if free > value:  # free nats active: constant loss, no gradient
        assert torch.all(post.grad == 0) and torch.all(prior.grad == 0)
    else:  # the prior gets 0.8 of its KL gradient, the posterior 0.2 of its own
        g_post, g_prior = torch.autograd.grad(kl_balance_loss(post, prior, 1.0, 0.0)[1].sum(), (post, prior))
        torch.testing.assert_close(prior.grad, 0.8 * g_prior)
        torch.testing.assert_close(post.grad, 0.2 * g_post)


def test_reward_head_sees_detached_features_unless_asked():
    """With reward_grad False the reward targets cannot change the representation's gradients."""
    batch = make_batch((5,))
    shifted = {**batch, REWARD: batch[REWARD] + 10.0}

    def encoder_grad(wm, batch):
        loss, _, _ = world_model_loss(wm, batch, generator=torch.Generator().manual_seed(0))
        return torch.autograd.grad(loss, wm.encoder.net[0].weight)[0]

    for reward_grad in (False, True):
        torch.manual_seed(0)
        wm = WorldModel((5,), 2, WorldModelConfig(**{**TINY.__dict__, "reward_grad": reward_grad}))
        same = torch.allclose(encoder_grad(wm, batch), encoder_grad(wm, shifted))
        assert same != reward_grad


def _smooth_batch(batch=8, length=16, obs_dim=6, action_dim=2):
    g = torch.Generator().manual_seed(0)
    time = torch.arange(length, dtype=torch.float32)[None, :, None]
    freq = torch.linspace(0.2, 0.6, obs_dim)[None, None]
    phase = torch.rand(batch, 1, obs_dim, generator=g) * 6.28
    obs = torch.sin(freq * time + phase)
    action = torch.cos(0.3 * time + phase[..., :action_dim])
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    return {OBSERVATION: obs, ACTION: action, REWARD: obs[..., 0], IS_FIRST: is_first}


def test_world_model_loss_falls_on_a_smooth_trajectory():
    from choreo.agents.actor_critic import Optimizer

    torch.manual_seed(0)
    cfg = WorldModelConfig(**{**TINY.__dict__, "lr": 3e-3})
    wm = WorldModel((6,), 2, cfg)
    opt = Optimizer(wm.parameters(), cfg.lr, cfg.eps, cfg.grad_clip, cfg.weight_decay, "world_model")
    batch = _smooth_batch()
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        loss, metrics, _ = world_model_loss(wm, batch, generator=g)
        opt.step(loss)
        history.append({k: v.item() for k, v in metrics.items()})
    first, last = history[0], history[-1]
    assert last["world_model/loss"] < 0.6 * first["world_model/loss"]  # the KL's free nat is a floor
    assert last["world_model/obs_loss"] < 0.4 * first["world_model/obs_loss"]
    assert last["world_model/reward_loss"] < 0.5 * first["world_model/reward_loss"]


# ---- imagination ----------------------------------------------------------------------------


def test_imagine_shapes_detaching_and_dynamics_gradients():
    torch.manual_seed(0)
    wm = WorldModel((5,), 2, TINY)
    _, _, out = world_model_loss(wm, make_batch((5,)))
    actor = torch.nn.Linear(FEAT, 2)
    seen = []

    def policy(state, t):
        assert not state.deter.requires_grad and not state.stoch.requires_grad
        seen.append(t)
        return torch.tanh(actor(wm.rssm.feature(state)))

    traj = imagine(wm, out.post, policy, horizon=4, generator=torch.Generator().manual_seed(0))
    assert seen == [0, 1, 2, 3]
    assert traj.feat.shape == (5, 18, FEAT) and traj.action.shape == (5, 18, 2)
    assert traj.state.deter.shape == (5, 18, 32) and traj.state.stoch.shape == (5, 18, 4, 4)
    assert torch.equal(traj.action[-1], torch.zeros(18, 2))
    assert torch.equal(traj.state.deter[0], out.post.deter.reshape(18, 32))  # start = flattened posterior
    # the last feature depends on the first action through the dynamics
    (grad,) = torch.autograd.grad(traj.feat[-1].sum(), actor.weight)
    assert grad.abs().sum() > 0
    # and nothing flows back into the (detached) start states
    encoder_grads = torch.autograd.grad(traj.feat[-1].sum(), list(wm.encoder.parameters()), allow_unused=True)
    assert all(g is None for g in encoder_grads)


def test_the_convolutions_run_channels_last_with_the_values_and_gradients_of_the_plain_layout():
    torch.manual_seed(0)
    enc, dec = ConvEncoder(depth=4), ConvDecoder(FEAT, depth=4)
    image = torch.randn(2, 3, 3, 64, 64)  # [B, T, C, H, W]
    feat = torch.randn(2, 3, FEAT)

    def plain_encoder(x):  # the same layers on the contiguous (NCHW) layout, flattened as [C, H, W]
        return enc.net(x.reshape(-1, 3, 64, 64).contiguous()).reshape(2, 3, -1)

    def plain_decoder(f):
        return dec.net(dec.linear(f).reshape(-1, 32 * 4, 1, 1).contiguous()).reshape(2, 3, 3, 64, 64)

    for module, fast, plain, x in ((enc, enc, plain_encoder, image), (dec, dec, plain_decoder, feat)):
        out = fast(x)
        grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
        ref = plain(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(module.parameters()))
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert enc(image).is_contiguous()  # flattened: the next layers see an ordinary vector
