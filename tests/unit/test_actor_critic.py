"""The imagination actor-critic, its optimizer and lambda-returns."""

import copy
import io

import pytest
import torch

from choreo.vocabulary import ACTION, IS_FIRST, OBSERVATION, REWARD
from choreo.agents.config import ActorCriticConfig, WorldModelConfig
from choreo.agents.actor_critic import ActorCritic, Optimizer, lambda_return, update_slow_target
from choreo.agents.world_model import WorldModel, world_model_loss

WM_TINY = WorldModelConfig(deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2, cnn_depth=4)
AC_TINY = ActorCriticConfig(horizon=4, units=32, layers=2, slow_target_every=3, actor_lr=1e-3, critic_lr=1e-3)


def make_world(seed=0, obs_dim=5, action_dim=2, batch=3, length=6):
    torch.manual_seed(seed)
    wm = WorldModel((obs_dim,), action_dim, WM_TINY)
    g = torch.Generator().manual_seed(seed)
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    data = {
        OBSERVATION: torch.randn(batch, length, obs_dim, generator=g),
        ACTION: torch.rand(batch, length, action_dim, generator=g) * 2 - 1,
        REWARD: torch.randn(batch, length, generator=g),
        IS_FIRST: is_first,
    }
    with torch.no_grad():
        _, _, out = world_model_loss(wm, data, generator=g)
    return wm, out.post


def feat_reward(traj):
    return traj.feat[..., :8].sum(-1)  # depends on the imagined states, so the actor gets gradients


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


# ---- lambda-returns and the optimizer -------------------------------------------------------


@pytest.mark.parametrize("tensor_discount", [False, True])
def test_lambda_return_matches_a_python_loop(tensor_discount):
    g = torch.Generator().manual_seed(0)
    H, N, lam = 5, 3, 0.9
    reward, value = torch.randn(H, N, generator=g), torch.randn(H, N, generator=g)
    bootstrap = torch.randn(N, generator=g)
    discount = torch.rand(H, N, generator=g) if tensor_discount else 0.97
    got = lambda_return(reward, value, discount, bootstrap, lam)
    disc = discount if tensor_discount else torch.full((H, N), discount)
    expected = torch.zeros(H, N)
    for n in range(N):
        following = bootstrap[n].item()  # R_{t+1}
        for t in reversed(range(H)):
            next_value = value[t + 1, n].item() if t + 1 < H else bootstrap[n].item()
            following = reward[t, n].item() + disc[t, n].item() * ((1 - lam) * next_value + lam * following)
            expected[t, n] = following
    torch.testing.assert_close(got, expected)
    # lambda = 1: discounted Monte-Carlo return bootstrapped at the end; lambda = 0: one-step TD
    torch.testing.assert_close(lambda_return(reward, value, 1.0, bootstrap, 1.0),
                               reward.flip(0).cumsum(0).flip(0) + bootstrap)
    torch.testing.assert_close(lambda_return(reward, value, 0.5, bootstrap, 0.0),
                               reward + 0.5 * torch.cat([value[1:], bootstrap[None]]))


def test_optimizer_clips_the_gradient_norm_and_decays_before_the_step():
    param = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = Optimizer([param], lr=0.0, eps=1e-5, grad_clip=1.0, weight_decay=0.1, name="test")
    metrics = opt.step((param * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum())
    torch.testing.assert_close(metrics["test/grad_norm"], torch.tensor(5.0))  # before clipping
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))  # clipped to norm 1
    torch.testing.assert_close(param.detach(), torch.full((4,), 1.8))  # lr 0: decay only, (1 - 0.1) p
    assert metrics["test/loss"].shape == () and not metrics["test/loss"].requires_grad

    # With a learning rate the first Adam step moves each coordinate by about lr * sign(grad).
    param = torch.nn.Parameter(torch.zeros(2))
    opt = Optimizer([param], lr=0.1, eps=1e-8, grad_clip=100.0, weight_decay=0.0, name="test")
    opt.step((param * torch.tensor([3.0, -4.0])).sum())
    torch.testing.assert_close(param.detach(), torch.tensor([-0.1, 0.1]))
    state = copy.deepcopy(opt.state_dict())
    fresh = Optimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.5, eps=1e-8, grad_clip=1.0)
    fresh.load_state_dict(state)
    assert fresh.adam.param_groups[0]["lr"] == 0.1


# ---- the actor-critic -----------------------------------------------------------------------


def test_update_changes_actor_and_critic_but_not_the_world_model():
    wm, start = make_world()
    ac = ActorCritic(wm.feat_dim, 2, AC_TINY)
    wm_before, ac_before = snapshot(wm), snapshot(ac)
    traj, metrics = ac.update(wm, start, feat_reward, generator=torch.Generator().manual_seed(0))
    for key, value in snapshot(wm).items():
        assert torch.equal(value, wm_before[key]), key
    assert all(p.grad is None for p in wm.parameters())
    assert all(p.requires_grad for p in wm.parameters())  # unfrozen afterwards
    after = snapshot(ac)
    for prefix in ("actor.", "critic."):
        keys = [k for k in after if k.startswith(prefix)]
        assert keys and all(not torch.equal(after[k], ac_before[k]) for k in keys), prefix
    assert traj.feat.shape == (5, 18, wm.feat_dim) and traj.action.shape == (5, 18, 2)
    assert metrics["actor_critic/actor/grad_norm"] > 0 and metrics["actor_critic/critic/grad_norm"] > 0
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    assert int(ac.updates) == 1


def test_actor_loss_follows_the_reference_indexing():
    """With a zero critic and zero entropy scale, the actor loss is -mean(weight[:-2] * target[1:])."""
    wm, start = make_world()
    ac = ActorCritic(wm.feat_dim, 2, AC_TINY)
    with torch.no_grad():
        for p in ac.target_critic.parameters():
            p.zero_()
    reward = torch.arange(5, dtype=torch.float32)[:, None].expand(5, 18)  # reward[t] = t
    _, metrics = ac.update(wm, start, lambda traj: reward, generator=torch.Generator().manual_seed(0))
    target = lambda_return(reward[:-1], torch.zeros(4, 18), 0.99, torch.zeros(18), 0.95)
    weight = 0.99 ** torch.arange(5.0)
    expected = -(weight[:-2, None] * target[1:]).mean()
    torch.testing.assert_close(metrics["actor_critic/actor/loss"], expected)


def test_slow_target_copies_on_schedule():
    wm, start = make_world()
    ac = ActorCritic(wm.feat_dim, 2, AC_TINY)  # every 3 updates, hard copy
    g = torch.Generator().manual_seed(0)

    def target_equals_critic():
        return all(torch.equal(t, c) for t, c in zip(ac.target_critic.parameters(), ac.critic.parameters()))

    assert target_equals_critic()
    assert not any(p.requires_grad for p in ac.target_critic.parameters())
    copied = []
    for _ in range(7):
        ac.update(wm, start, feat_reward, generator=g)
        copied.append(target_equals_critic())
    assert copied == [True, False, False, True, False, False, True]  # after updates 0, 3, 6


def test_update_slow_target_function_reads_and_counts_the_buffer():
    critic, target = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    updates = torch.zeros((), dtype=torch.int64)
    cfg = ActorCriticConfig(slow_target_every=2, slow_target_fraction=0.5)
    assert update_slow_target(critic, target, updates, cfg) == 1 and int(updates) == 1
    torch.testing.assert_close(target.weight, critic.weight)  # update 0: copy
    with torch.no_grad():
        critic.weight.add_(1.0)
    update_slow_target(critic, target, updates, cfg)  # update 1: nothing
    torch.testing.assert_close(target.weight, critic.weight - 1.0)
    update_slow_target(critic, target, updates, cfg)  # update 2: halfway
    torch.testing.assert_close(target.weight, critic.weight - 0.5)
    assert int(updates) == 3


def test_slow_target_mixes_by_fraction():
    wm, start = make_world()
    cfg = ActorCriticConfig(**{**AC_TINY.__dict__, "slow_target_every": 1, "slow_target_fraction": 0.25})
    ac = ActorCritic(wm.feat_dim, 2, cfg)
    g = torch.Generator().manual_seed(0)
    ac.update(wm, start, feat_reward, generator=g)  # update 0: full copy
    old_target = [p.clone() for p in ac.target_critic.parameters()]
    ac.update(wm, start, feat_reward, generator=g)
    for old, new, critic in zip(old_target, ac.target_critic.parameters(), ac.critic.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * critic)


def test_state_dict_round_trip_gives_an_identical_next_update():
    wm, start = make_world()
    ac = ActorCritic(wm.feat_dim, 2, AC_TINY)
    for i in range(2):
        ac.update(wm, start, feat_reward, generator=torch.Generator().manual_seed(i))
    buffer = io.BytesIO()
    torch.save(ac.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # a fresh module with different weights and empty optimizers
    restored = ActorCritic(wm.feat_dim, 2, AC_TINY)
    restored.load_state_dict(state)
    assert restored._updates == 2 and int(restored.updates) == 2

    results = []
    for module in (ac, restored):
        _, metrics = module.update(wm, start, feat_reward, generator=torch.Generator().manual_seed(7))
        results.append((snapshot(module), metrics))
    (a, ma), (b, mb) = results
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    # the optimizer state continued as well (Adam step counts)
    assert ac.actor_opt.state_dict()["state"][0]["step"] == restored.actor_opt.state_dict()["state"][0]["step"] == 3


def test_condition_is_part_of_the_inputs():
    wm, start = make_world()
    ac = ActorCritic(wm.feat_dim, 2, AC_TINY, condition_dim=3)
    condition = torch.eye(3)[torch.arange(18) % 3]  # [N, C], one-hot skills
    traj, _ = ac.update(wm, start, feat_reward, condition=condition, generator=torch.Generator().manual_seed(0))
    assert traj.feat.shape == (5, 18, wm.feat_dim)
    feat = wm.rssm.feature(start.flatten())
    a = ac.act(feat, condition, sample=False)
    b = ac.act(feat, condition.roll(1, 0), sample=False)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        ac.act(feat)


def test_act():
    wm, start = make_world()
    ac = ActorCritic(wm.feat_dim, 2, AC_TINY)
    feat = wm.rssm.feature(start.flatten())
    mode = ac.act(feat, sample=False)
    assert mode.shape == (18, 2) and torch.equal(mode, ac.act(feat, sample=False))
    a = ac.act(feat, generator=torch.Generator().manual_seed(0))
    b = ac.act(feat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, mode) and a.abs().max() < 1
    assert not a.requires_grad
