"""Zero-shot planning over skills (agents/planning.py): DADS and codebook MPC policies and the
random-skill baseline (fast, no Ray, tiny models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.policy import ChoreographerPolicy
from choreo.agents.config import AgentConfig
from choreo.agents.dads.agent import DadsAgent
from choreo.agents.dads.config import DadsConfig, PlannerConfig
from choreo.agents.dads.planner import mppi_continuous, mppi_discrete, plan_returns
from choreo.agents.distributions import TruncatedNormal
from choreo.agents.planning import (CodebookPlanningPolicy, DadsPlanningPolicy, RandomSkillPolicy,
                                    all_code_plans, mppi_continuous_batched, mppi_discrete_batched)
from choreo.agents.world_model import State
from choreo.launch.config import load_config

torch.set_num_threads(1)

OBS, ACTIONS = 4, 2


def dads_agent(**dads) -> DadsAgent:
    base = dict(hidden=32, prior_samples=4, dynamics_dims=(0, 1))
    return DadsAgent((OBS,), ACTIONS, AgentConfig(dads=DadsConfig(**{**base, **dads})), seed=0, device="cpu")


def choreographer_agent(obs_shape=(OBS,)) -> ChoreographerAgent:
    return ChoreographerAgent(obs_shape, ACTIONS, load_config(["tiny"], []).agent, seed=0, device="cpu")


def goal_reward(goals: torch.Tensor):
    """-|x-y - goal| of each predicted observation, with each environment's goal bound."""
    def reward(observations, env):
        return -(observations[..., :2] - goals[env][:, None, None]).norm(dim=-1)
    return reward


class SkillFollowingActor(nn.Module):
    """Stands in for the SAC actor: its mean action, tanh(mean), is the skill (the last D inputs)."""

    def forward(self, x):
        skill = x[..., -2:].clamp(-0.999, 0.999)
        return torch.cat([torch.atanh(skill), torch.zeros_like(skill)], -1)


def known_dads(monkeypatch, calls=None) -> DadsAgent:
    """A DADS agent whose q moves x-y by 0.1 z per step and whose actor's action is the skill."""
    agent = dads_agent()

    def predict(state, skill):
        if calls is not None:
            calls.append(tuple(state.shape))
        return state + 0.1 * skill

    monkeypatch.setattr(agent.dynamics, "predict", predict)
    agent.sac.actor = SkillFollowingActor()
    return agent


def point_env_step(obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The world q describes: x-y moves 0.1 * action."""
    out = obs.copy()
    out[:, :2] += 0.1 * action
    return out


# ----------------------------------------------------------------------------- batched MPPI


def test_batched_mppi_with_one_environment_matches_the_single_start_planner():
    def step(states, skills):
        return states + 0.1 * skills[..., :2]

    def reward(states):
        return -(states - torch.tensor([0.3, -0.2])).norm(dim=-1)

    cfg = PlannerConfig(horizon=2, hold=3, candidates=16, iterations=3, variance=0.3, smoothing=0.5)
    start = torch.zeros(2)
    single = mppi_continuous(step, reward, start, cfg, 2, generator=torch.Generator().manual_seed(4))

    def returns_fn(plans):  # [1, K, H_P, D]
        return plan_returns(step, reward, start.expand(plans.shape[1], 2), plans[0], cfg.hold)[None]

    mean, best = mppi_continuous_batched(returns_fn, torch.zeros(1, 2, 2), cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(mean[0], single.mean)
    torch.testing.assert_close(best[0], single.best_return)

    moves = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])

    def code_step(states, skills):
        return states + 0.1 * skills @ moves

    single = mppi_discrete(code_step, reward, start, cfg, 4, generator=torch.Generator().manual_seed(5))

    def code_returns(plans):
        return plan_returns(code_step, reward, start.expand(plans.shape[1], 2), plans[0], cfg.hold)[None]

    probs, best = mppi_discrete_batched(code_returns, torch.full((1, 2, 4), 0.25), cfg,
                                        torch.Generator().manual_seed(5))
    torch.testing.assert_close(probs[0], single.probs)
    torch.testing.assert_close(best[0], single.best_return)


def test_all_code_plans_enumerates_every_sequence_once():
    plans = all_code_plans(3, 2)
    assert plans.shape == (9, 2)
    assert sorted(map(tuple, plans.tolist())) == [(a, b) for a in range(3) for b in range(3)]


# ----------------------------------------------------------------------------- DADS


@pytest.mark.parametrize("policy_kind", ["plan", "random"])
def test_dads_policies_act_on_a_batch_of_environments(policy_kind):
    agent = dads_agent()
    cfg = PlannerConfig(hold=3, candidates=8, iterations=2)
    if policy_kind == "plan":
        policy = DadsPlanningPolicy(agent, goal_reward(torch.ones(5, 2)), cfg, seed=1)
    else:
        policy = RandomSkillPolicy(agent, cfg, seed=1)
    obs = np.random.default_rng(0).standard_normal((5, OBS)).astype(np.float32)
    state = policy.initial_state(5)
    for t in range(4):
        action, state, extras = policy.act(obs, np.full(5, t == 0), state, mode="mode" if t % 2 else "sample")
        assert action.shape == (5, ACTIONS) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
        assert set(extras) == {"skill"}
        assert extras["skill"].shape == (5,) and extras["skill"].dtype == np.int32 and np.all(extras["skill"] == -1)
        assert state.skill.shape == (5, 2) and state.skill.abs().max() <= 1
    assert policy.version == 0
    with pytest.raises(ValueError, match="unknown mode"):
        policy.act(obs, np.zeros(5, bool), state, mode="greedy")


def test_replans_exactly_every_hold_steps_and_at_episode_starts(monkeypatch):
    calls: list = []
    agent = known_dads(monkeypatch, calls)
    cfg = PlannerConfig(hold=3, candidates=8, iterations=2)
    policy = DadsPlanningPolicy(agent, goal_reward(torch.ones(3, 2)), cfg, seed=0)
    obs = np.zeros((3, OBS), np.float32)
    first = np.zeros((9, 3), bool)
    first[0] = True
    first[4, 1] = True  # environment 1 starts a new episode at step 4
    state = policy.initial_state(3)
    replanned, skills, planned_rows = [], [], []
    for t in range(9):
        calls.clear()
        _, state, _ = policy.act(obs, first[t], state, mode="mode")
        replanned.append(state.replanned.tolist())
        skills.append(state.skill.clone())
        planned_rows.append({shape[:2] for shape in calls})
    expected = np.zeros((9, 3), bool)
    expected[[0, 3]] = True
    expected[6, [0, 2]] = True
    expected[[4, 7], 1] = True  # restarted by its episode start, then every 3 steps from there
    assert np.array_equal(np.array(replanned), expected)
    # One batched plan per step over the M environments that are due: q sees [M, K] states.
    assert planned_rows[0] == {(3, 8)} and planned_rows[4] == {(1, 8)} and planned_rows[6] == {(2, 8)}
    assert planned_rows[1] == set()
    for t in range(1, 9):  # a skill changes only where a plan was made
        held = ~torch.tensor(expected[t])
        assert torch.equal(skills[t][held], skills[t - 1][held])


def test_dads_planner_steers_towards_each_goal_better_than_random_skills(monkeypatch):
    agent = known_dads(monkeypatch)
    goals = torch.tensor([[1.0, 0.5], [-0.8, -0.6], [0.0, 1.0], [0.7, -0.9]])
    cfg = PlannerConfig(horizon=1, hold=5, candidates=64, iterations=5, gamma=10.0, variance=0.3)
    planner = DadsPlanningPolicy(agent, goal_reward(goals), cfg, seed=0)
    random = RandomSkillPolicy(agent, cfg, seed=0)

    finals = {}
    for name, policy in (("plan", planner), ("random", random)):
        obs = np.zeros((4, OBS), np.float32)
        state = policy.initial_state(4)
        for t in range(40):
            action, state, _ = policy.act(obs, np.full(4, t == 0), state, mode="mode")
            if name == "plan" and t == 0:  # the first skills point at the goals
                cosine = F.cosine_similarity(state.skill, goals, dim=-1)
                assert torch.all(cosine > 0.9), cosine
                # ... and the executor acts on them (the stand-in actor's action is the skill).
                np.testing.assert_allclose(action, state.skill.numpy(), atol=1e-3)
            obs = point_env_step(obs, action)
        finals[name] = np.linalg.norm(obs[:, :2] - goals.numpy(), axis=-1)
    assert np.all(finals["plan"] < 0.1), finals
    assert finals["plan"].mean() < 0.25 * finals["random"].mean(), finals


def test_dads_predictions_keep_unmodelled_dims_and_approach_the_goal(monkeypatch):
    agent = known_dads(monkeypatch)
    goals = torch.tensor([[1.0, 0.0]])
    cfg = PlannerConfig(horizon=2, hold=4, candidates=32, iterations=4, variance=0.3)
    policy = DadsPlanningPolicy(agent, goal_reward(goals), cfg, seed=0)
    obs = torch.tensor([[0.0, 0.0, 7.0, -3.0]])
    plans = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[-1.0, 0.0], [0.0, 1.0]]]])  # [1, 2, H_P, D]
    with torch.inference_mode():
        predicted = policy.model.imagine(obs, torch.tensor([0]), plans, cfg.hold, None)
        returns = policy.plan_returns(obs, torch.tensor([0]), plans)
    assert predicted.shape == (1, 2, 8, OBS)
    assert torch.all(predicted[..., 2] == 7.0) and torch.all(predicted[..., 3] == -3.0)
    torch.testing.assert_close(predicted[0, 0, :, 0], 0.1 * torch.arange(1, 9.0))  # towards the goal
    assert returns[0, 0] > returns[0, 1]


@pytest.mark.parametrize("candidates", [4, 32])
def test_model_and_reward_calls_per_plan_do_not_depend_on_the_candidates(monkeypatch, candidates):
    calls: list = []
    agent = known_dads(monkeypatch, calls)
    shapes = []

    def reward(observations, env):
        shapes.append(tuple(observations.shape))
        return -observations[..., 0]

    cfg = PlannerConfig(horizon=2, hold=3, candidates=candidates, iterations=3)
    policy = DadsPlanningPolicy(agent, reward, cfg)
    policy.act(np.zeros((5, OBS), np.float32), np.ones(5, bool), policy.initial_state(5))
    assert len(calls) == cfg.iterations * cfg.horizon * cfg.hold
    assert set(calls) == {(5, candidates, 2)}
    assert shapes == [(5, candidates, 6, OBS)] * cfg.iterations


def test_reward_of_the_wrong_shape_is_refused():
    policy = DadsPlanningPolicy(dads_agent(), lambda obs, env: obs.sum((-2, -1)), PlannerConfig(candidates=4))
    with pytest.raises(ValueError, match=r"expected \(2, 4, 10\)"):
        policy.act(np.zeros((2, OBS), np.float32), np.ones(2, bool), policy.initial_state(2))


def test_discrete_dads_skills_are_planned_over_their_indices(monkeypatch):
    agent = dads_agent(skill_type="discrete", skill_dim=4)
    moves = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    monkeypatch.setattr(agent.dynamics, "predict", lambda s, z: s + 0.1 * z @ moves)
    goals = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    for exhaustive in (True, False):
        policy = DadsPlanningPolicy(agent, goal_reward(goals), PlannerConfig(candidates=8, iterations=3, gamma=20.0),
                                    exhaustive=exhaustive)
        assert policy.exhaustive == exhaustive
        _, _, extras = policy.act(np.zeros((2, OBS), np.float32), np.ones(2, bool), policy.initial_state(2))
        assert extras["skill"].tolist() == [1, 2]


def test_load_weights_accepts_only_the_agents_own_acting_weights():
    agent = dads_agent()
    policy = DadsPlanningPolicy(agent, goal_reward(torch.zeros(1, 2)))
    policy.load_weights(agent.policy_weights(), version=7)
    assert policy.version == 7
    other = dads_agent(hidden=32)
    weights = {k: v + 1.0 for k, v in other.policy_weights().items()}
    with pytest.raises(ValueError, match="load new weights into the agent"):
        policy.load_weights(weights, version=8)


# ----------------------------------------------------------------------------- Choreographer


def test_codebook_planner_runs_end_to_end_and_filters_like_the_acting_policy():
    agent = choreographer_agent()
    goals = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    cfg = PlannerConfig(hold=3, candidates=8, iterations=2)  # 8 codes <= 8 candidates: exhaustive
    policy = CodebookPlanningPolicy(agent, goal_reward(goals), cfg, seed=3)
    assert policy.exhaustive
    reference = ChoreographerPolicy((OBS,), ACTIONS, agent.cfg, behaviour="skill", seed=3)
    reference.load_weights(agent.policy_weights(), version=0)
    obs = np.random.default_rng(0).standard_normal((3, OBS)).astype(np.float32)
    state = policy.initial_state(3)
    # The planner filters with the latent's mode (its imagination is deterministic), as the acting
    # policy does in "mode".
    _, ref_state, _ = reference.act(obs, np.ones(3, bool), reference.initial_state(3, skill=0), mode="mode")
    for t in range(7):
        action, state, extras = policy.act(obs, np.full(3, t == 0), state, mode="mode" if t % 2 else "sample")
        if t == 0:  # the first posterior, from the same observation and seed, is the acting policy's
            torch.testing.assert_close(state.model.latent.logits, ref_state.latent.logits)
            assert torch.equal(state.model.latent.stoch, ref_state.latent.stoch)
        assert action.shape == (3, ACTIONS) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
        assert extras["skill"].dtype == np.int32 and np.all((extras["skill"] >= 0) & (extras["skill"] < 8))
        assert torch.equal(state.model.prev_action, torch.from_numpy(action))
        assert torch.isfinite(state.predicted_return).all()
    assert state.replanned.all()  # step 6 = 2 * hold


def fake_imagination(agent, monkeypatch, num_codes, counter):
    """Code c's skill actor action is a unit move at angle c * 360 / C degrees; the imagined deter
    accumulates the actions and the decoder reads x-y from it."""
    angles = torch.arange(num_codes) * (2 * math.pi / num_codes)
    moves = 0.5 * torch.stack([angles.cos(), angles.sin()], -1)  # [C, 2]

    def policy(feat, code):
        mean = code @ moves
        return TruncatedNormal(mean, torch.full_like(mean, 0.1))

    def img_step(prev, action, generator=None):
        counter["img_step"] += 1
        deter = prev.deter.clone()
        deter[..., :2] += action
        return State(deter, prev.stoch, prev.logits)

    class Decoder(nn.Module):
        def forward(self, feat):
            counter["decoder"] += 1
            return feat[..., -agent.cfg.world_model.deter:][..., :OBS]

    monkeypatch.setattr(agent.skill_ac, "policy", policy)
    monkeypatch.setattr(agent.wm.rssm, "img_step", img_step)
    agent.wm.decoder = Decoder()
    return moves


@pytest.mark.parametrize("exhaustive", [True, False])
def test_codebook_planner_picks_the_code_whose_imagined_outcome_is_best(monkeypatch, exhaustive):
    agent = choreographer_agent()
    counter = {"img_step": 0, "decoder": 0}
    moves = fake_imagination(agent, monkeypatch, 8, counter)
    # Goals far along the directions of codes 2, 5 and 0; the imagined x-y starts at the posterior's deter.
    goals = 10.0 * moves[[2, 5, 0]] / moves[[2, 5, 0]].norm(dim=-1, keepdim=True)
    cfg = PlannerConfig(hold=4, candidates=8 if exhaustive else 24, iterations=4, gamma=5.0)
    policy = CodebookPlanningPolicy(agent, goal_reward(goals), cfg, seed=0, exhaustive=exhaustive)
    assert policy.exhaustive == exhaustive
    obs = np.random.default_rng(0).standard_normal((3, OBS)).astype(np.float32)
    action, state, extras = policy.act(obs, np.ones(3, bool), policy.initial_state(3), mode="mode")
    assert extras["skill"].tolist() == [2, 5, 0]
    np.testing.assert_allclose(action, moves[[2, 5, 0]].numpy(), atol=1e-6)  # executed by the skill actor
    iterations = 1 if exhaustive else cfg.iterations
    assert counter == {"img_step": iterations * cfg.hold, "decoder": iterations}  # batched over N * K


def test_codebook_imagination_in_mode_is_deterministic():
    agent = choreographer_agent()
    policy = CodebookPlanningPolicy(agent, goal_reward(torch.zeros(2, 2)), PlannerConfig(hold=3, candidates=4))
    obs = torch.from_numpy(np.random.default_rng(1).standard_normal((2, OBS)).astype(np.float32))
    plans = F.one_hot(torch.tensor([[[1], [3], [1], [6]], [[0], [0], [7], [2]]]), 8).float()  # [2, 4, 1, 8]
    with torch.inference_mode():
        context, _ = policy.model.observe(obs, torch.ones(2, dtype=torch.bool), policy.model.initial_state(2),
                                          policy.generator)
        first = policy.model.imagine(context, torch.arange(2), plans, 3, policy.generator)
        second = policy.model.imagine(context, torch.arange(2), plans, 3, policy.generator)
    assert first.shape == (2, 4, 3, OBS)
    assert torch.equal(first, second)
    torch.testing.assert_close(first[0, 0], first[0, 2])  # the same code from the same start


def test_random_codes_are_held_and_redrawn():
    agent = choreographer_agent()
    policy = RandomSkillPolicy(agent, PlannerConfig(hold=4), seed=0)
    obs = np.zeros((16, OBS), np.float32)
    state = policy.initial_state(16)
    skills = []
    for t in range(8):
        _, state, extras = policy.act(obs, np.full(16, t == 0), state)
        skills.append(extras["skill"])
    skills = np.stack(skills)
    assert np.all((skills >= 0) & (skills < 8))
    assert np.all(skills[:4] == skills[0]) and np.all(skills[4:] == skills[4])
    assert np.any(skills[0] != skills[4])


def test_planning_policies_refuse_the_other_agent():
    with pytest.raises(TypeError, match="ChoreographerAgent"):
        CodebookPlanningPolicy(dads_agent(), goal_reward(torch.zeros(1, 2)))
    with pytest.raises(TypeError, match="DadsAgent"):
        DadsPlanningPolicy(choreographer_agent(), goal_reward(torch.zeros(1, 2)))


def test_codebook_planner_decodes_pixel_observations_for_the_reward():
    agent = choreographer_agent((3, 64, 64))
    shapes = []

    def brightness(observations, env):  # decoded images, scaled to [-0.5, 0.5]
        shapes.append(tuple(observations.shape))
        return observations.mean((-3, -2, -1))

    policy = CodebookPlanningPolicy(agent, brightness, PlannerConfig(hold=2, candidates=4, iterations=2))
    obs = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    action, _, extras = policy.act(obs, np.ones(2, bool), policy.initial_state(2))
    assert action.shape == (2, ACTIONS) and np.all((extras["skill"] >= 0) & (extras["skill"] < 8))
    assert shapes == [(2, 4, 2, 3, 64, 64)] * 2


def test_candidates_with_non_finite_returns_get_no_weight():
    def returns_fn(plans):  # [1, K, 1, 1]: NaN for positive skills, else the closer to -0.5 the better
        z = plans[:, :, 0, 0]
        return torch.where(z > 0, float("nan"), -(z + 0.5).abs())

    cfg = PlannerConfig(candidates=32, iterations=3, variance=0.5)
    mean, best = mppi_continuous_batched(returns_fn, torch.zeros(1, 1, 1), cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(mean).all() and -1 <= mean.item() <= 0 and torch.isfinite(best).all()
    mean, _ = mppi_continuous_batched(lambda plans: torch.full(plans.shape[:2], float("nan")), torch.zeros(1, 1, 1),
                                      cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(mean).all()
