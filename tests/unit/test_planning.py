"""Zero-shot planning over skills (agents/planning.py): MPPI on toy skill models with known optima,
the DADS and codebook planning policies, the random-skill baseline and the planner's settings
(fast, no Ray, tiny models)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from choreo.agents import planning
from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.policy import ChoreographerPolicy
from choreo.agents.config import AgentConfig, PlannerConfig
from choreo.agents.dads.agent import DadsAgent
from choreo.agents.dads.config import DadsConfig
from choreo.agents.distributions import TruncatedNormal
from choreo.agents.planning import (CodebookPlanningPolicy, DadsPlanningPolicy, PlanningPolicy, RandomSkillPolicy,
                                    all_code_plans, exhaustive_discrete, mppi_continuous, mppi_discrete)
from choreo.agents.world_model import State
from choreo.launch.runtime.config import (ConfigError, from_dict, from_yaml_file, iter_fields, load_config,
                                          snapshot_shape_keys, to_dict)

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


# ----------------------------------------------------------------------------- MPPI on toy models


class PointModel:
    """A toy skill model: a point in the plane that moves 0.1 * z per step under a continuous
    skill z, or 0.1 * moves[c] under code c (one-hot plans); the executor's action is that move."""

    def __init__(self, moves: torch.Tensor | None = None) -> None:
        self.moves = moves
        self.skill_type = "continuous" if moves is None else "discrete"
        self.skill_dim = 2 if moves is None else len(moves)
        self.device = torch.device("cpu")

    def initial_state(self, n):
        return None

    def observe(self, observation, is_first, state, generator):
        return observation.float(), None

    def imagine(self, start, plans, hold, generator):  # [M, 2], [M, K, H_P, D] -> [M, K, H, 2]
        velocity = plans if self.moves is None else plans @ self.moves
        return start[:, None, None] + 0.1 * velocity.repeat_interleave(hold, 2).cumsum(2)

    def act(self, context, state, skill, sample, generator):
        return (skill if self.moves is None else skill @ self.moves).clone(), None

    def acting_weights(self):
        return {}


def grid_best(policy: PlanningPolicy, start: torch.Tensor, plans: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The best of `plans [P, H_P, D]` by exhaustive search with the policy's own returns, and its return."""
    with torch.inference_mode():
        returns = policy.plan_returns(start[None], torch.tensor([0]), plans[None])[0]
    return plans[returns.argmax()], returns.max().item()


def plan_return(policy: PlanningPolicy, start: torch.Tensor, plan: torch.Tensor) -> float:
    with torch.inference_mode():
        return policy.plan_returns(start[None], torch.tensor([0]), plan[None, None]).item()


@pytest.mark.parametrize("seed", range(3))
def test_mppi_continuous_finds_the_optimum_of_a_toy_problem(seed):
    goals = torch.tensor([[0.3, -0.2], [-0.4, 0.1], [0.1, 0.5]])

    def reward(observations, env):
        return -(observations - goals[env][:, None, None]).square().sum(-1)

    # A narrower sampling distribution than the reference's 1.5 I: with K = 64 candidates in 2-D
    # a wide one leaves about one candidate near the optimum, and the weighted mean is that close.
    cfg = PlannerConfig(horizon=1, hold=10, candidates=64, iterations=10, gamma=30.0, variance=0.05)
    policy = PlanningPolicy(PointModel(), reward, cfg, seed=seed)
    action, state, extras = policy.act(np.zeros((3, 2), np.float32), np.ones(3, bool), policy.initial_state(3),
                                       mode="mode")
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 201), torch.linspace(-1, 1, 201), indexing="ij"), -1)
    for env, goal in enumerate(goals):
        single = PlanningPolicy(PointModel(), lambda obs, rows, g=goal: -(obs - g).square().sum(-1), cfg)
        best, best_return = grid_best(single, torch.zeros(2), grid.reshape(-1, 1, 2))
        # By hand, sum_t |0.1 t z - g|^2 is smallest at z = g * 10 sum_t t / sum_t t^2 = g * 10 / 7.
        torch.testing.assert_close(best[0], goal * 10 / 7, atol=0.011, rtol=0)
        skill = state.skill[env]
        assert (skill - best[0]).norm() < 0.07, (env, skill, best)
        assert plan_return(single, torch.zeros(2), skill[None]) > best_return - 0.02
        assert best_return - 0.1 < state.predicted_return[env] <= best_return + 1e-3  # a candidate's return
    np.testing.assert_array_equal(action, state.skill.numpy())  # the executor acts on the planned skill
    assert np.all(extras["skill"] == -1)


def test_mppi_continuous_plans_several_segments():
    # Targets: (0.5, 0) for the first 5 steps, then (0.5, 0.5); the grid optimum goes right and a
    # little up, then straight up: ((1, 0.3), (0, 1)).
    def reward(observations, env):  # [M, K, 10, 2]
        first = (torch.arange(observations.shape[2]) < 5)[:, None]
        target = torch.where(first, torch.tensor([0.5, 0.0]), torch.tensor([0.5, 0.5]))
        return -(observations - target).square().sum(-1)

    cfg = PlannerConfig(horizon=2, hold=5, candidates=128, iterations=15, gamma=20.0, variance=0.3)
    policy = PlanningPolicy(PointModel(), reward, cfg, seed=0)
    axis = torch.linspace(-1, 1, 21)
    best, best_return = grid_best(policy, torch.zeros(2), torch.cartesian_prod(axis, axis, axis, axis).view(-1, 2, 2))
    torch.testing.assert_close(best, torch.tensor([[1.0, 0.3], [0.0, 1.0]]), atol=1e-6, rtol=0)
    _, state, _ = policy.act(np.zeros((1, 2), np.float32), np.ones(1, bool), policy.initial_state(1))
    # The executed skill is the first segment's mean; the second one's is the next plan's warm start.
    mean = torch.stack([state.skill[0], state.warm[0, 0]])
    torch.testing.assert_close(mean, best, atol=0.12, rtol=0)
    assert torch.equal(state.warm[0, 1], torch.zeros(2))  # a fresh segment at the prior's centre
    assert mean.abs().max() <= 1.0
    assert plan_return(policy, torch.zeros(2), mean) > best_return - 0.01


@pytest.mark.parametrize("exhaustive", [False, True])
def test_mppi_discrete_finds_the_best_code_sequence(exhaustive):
    angles = torch.arange(8) * (2 * math.pi / 8)
    moves = torch.stack([angles.cos(), angles.sin()], -1)  # code k moves in direction k * 45 degrees

    def reward(observations, env):  # north-east for 3 steps, then west
        first = (torch.arange(observations.shape[2]) < 3)[:, None]
        target = torch.where(first, torch.tensor([0.21, 0.21]), torch.tensor([0.0, 0.21]))
        return -(observations - target).norm(dim=-1)

    cfg = PlannerConfig(horizon=2, hold=3, candidates=64, iterations=6, gamma=50.0, mix=0.7)
    policy = PlanningPolicy(PointModel(moves), reward, cfg, seed=0, exhaustive=exhaustive)
    assert policy.exhaustive == exhaustive  # 8 ** 2 plans <= 64 candidates
    sequences = all_code_plans(8, 2)
    best, _ = grid_best(policy, torch.zeros(2), F.one_hot(sequences, 8).float())
    assert best.argmax(-1).tolist() == [1, 4]
    action, state, extras = policy.act(np.zeros((1, 2), np.float32), np.ones(1, bool), policy.initial_state(1))
    assert extras["skill"].tolist() == [1] and state.warm[0, 0].argmax().item() == 4
    assert torch.equal(state.skill[0], F.one_hot(torch.tensor(1), 8).float())
    np.testing.assert_allclose(action[0], moves[1].numpy())
    torch.testing.assert_close(state.warm.sum(-1), torch.ones(1, 2))
    torch.testing.assert_close(state.warm[0, 1], torch.full((8,), 1 / 8))  # a fresh uniform segment


def test_mppi_continuous_samples_around_the_mean_and_applies_the_update_rule():
    # Two environments that want opposite skills; each iteration's candidates are the previous
    # mean plus the generator's Gaussian draws, clipped and smoothed; the means are the
    # softmax(gamma (R - max R))-weighted means of each environment's own candidates.
    cfg = PlannerConfig(horizon=2, candidates=16, iterations=3, variance=0.3, smoothing=0.2, gamma=4.0)
    targets = torch.tensor([0.5, -0.5])
    seen = []

    def returns_fn(plans):  # [2, K, 2, 1]
        returns = -(plans[..., 0] - targets[:, None, None]).abs().sum(-1)
        seen.append((plans.clone(), returns))
        return returns

    warm = torch.tensor([[[0.2], [0.0]], [[-0.1], [0.3]]])
    mean, best = mppi_continuous(returns_fn, warm, cfg, torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(4)
    expected = warm
    for plans, returns in seen:
        raw = (expected[:, None] + 0.3 ** 0.5 * torch.randn(2, 16, 2, 1, generator=replay)).clamp(-1, 1)
        smoothed = torch.stack([raw[:, :, 0], 0.2 * raw[:, :, 0] + 0.8 * raw[:, :, 1]], 2)
        torch.testing.assert_close(plans, smoothed)
        weights = torch.softmax(4.0 * (returns - returns.max(-1, keepdim=True).values), -1)
        expected = (weights[..., None, None] * plans).sum(1)
    assert len(seen) == cfg.iterations
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(best, seen[-1][1].max(-1).values)
    assert mean[0, 0, 0] > 0 > mean[1, 0, 0]


def test_mppi_discrete_samples_from_each_segments_categorical_and_mixes_the_weighted_frequencies():
    cfg = PlannerConfig(horizon=2, candidates=20000, iterations=3, gamma=2.0, mix=0.6)
    preferred = torch.tensor([[2, 0], [1, 3]])  # per environment and segment
    seen = []

    def returns_fn(plans):  # [2, K, 2, 4] one-hot
        returns = (plans.argmax(-1) == preferred[:, None]).float().sum(-1)
        seen.append((plans.clone(), returns))
        return returns

    probs, best = mppi_discrete(returns_fn, torch.full((2, 2, 4), 0.25), cfg, torch.Generator().manual_seed(5))
    expected = torch.full((2, 2, 4), 0.25)
    for plans, returns in seen:
        assert torch.equal(plans.sum(-1), torch.ones(2, 20000, 2))  # one-hot codes
        torch.testing.assert_close(plans.mean(1), expected, atol=0.015, rtol=0)  # drawn from the categoricals
        weights = torch.softmax(2.0 * (returns - returns.max(-1, keepdim=True).values), -1)
        expected = 0.6 * (weights[..., None, None] * plans).sum(1) + 0.4 * expected
    torch.testing.assert_close(probs, expected, atol=2e-4, rtol=0)  # float32 sums over 20000 candidates
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2), atol=2e-4, rtol=0)
    assert torch.equal(probs.argmax(-1), preferred)
    assert torch.equal(best, torch.full((2,), 2.0))


def test_warm_start_shifts_the_plan_and_an_episode_start_restarts_from_the_prior(monkeypatch):
    starts = []
    original = planning.mppi_continuous

    def spy(returns_fn, mean, cfg, generator=None):
        starts.append(mean.clone())
        return original(returns_fn, mean, cfg, generator)

    monkeypatch.setattr(planning, "mppi_continuous", spy)
    goal = torch.tensor([0.3, -0.2])
    cfg = PlannerConfig(horizon=2, hold=2, candidates=32, iterations=3)
    policy = PlanningPolicy(PointModel(), lambda obs, env: -(obs - goal).norm(dim=-1), cfg, seed=0)
    obs = np.zeros((2, 2), np.float32)
    state = policy.initial_state(2)
    warms = []
    for first in ([True, True], [False, False], [False, True], [False, False]):
        _, state, _ = policy.act(obs, np.array(first), state)
        warms.append(state.warm.clone())
    assert len(starts) == 2 and torch.equal(starts[0], torch.zeros(2, 2, 2))  # steps 0 and 2 (hold 2)
    assert state.warm.shape == (2, 2, 2) and torch.equal(warms[0][:, 1], torch.zeros(2, 2))
    assert warms[0][:, 0].abs().sum() > 0
    torch.testing.assert_close(starts[1][0], warms[1][0])  # environment 0 goes on from its shifted plan
    assert torch.equal(starts[1][1], torch.zeros(2, 2))  # environment 1 started an episode: the prior


def test_exhaustive_search_scores_every_plan_once_and_returns_the_best():
    calls = []

    def returns_fn(plans):  # [2, 9, 2, 3]: environment 0 wants codes (2, 1), environment 1 (0, 0)
        calls.append(plans.shape)
        codes = plans.argmax(-1)
        return -(codes - torch.tensor([[2, 1], [0, 0]])[:, None]).abs().sum(-1).float()

    probs, best = exhaustive_discrete(returns_fn, 2, 3, 2)
    assert calls == [(2, 9, 2, 3)]
    assert probs.argmax(-1).tolist() == [[2, 1], [0, 0]] and torch.equal(probs.sum(-1), torch.ones(2, 2))
    assert torch.equal(best, torch.zeros(2))


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
        predicted = policy.model.imagine(obs, plans, cfg.hold, None)
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
        first = policy.model.imagine(context, plans, 3, policy.generator)
        second = policy.model.imagine(context, plans, 3, policy.generator)
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


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
def test_candidates_with_non_finite_returns_get_no_weight(bad):
    def returns_fn(plans):  # [1, K, 1, 1]: non-finite for positive skills, else the closer to -0.5 the better
        z = plans[:, :, 0, 0]
        return torch.where(z > 0, bad, -(z + 0.5).abs())

    cfg = PlannerConfig(candidates=32, iterations=3, variance=0.5)
    mean, best = mppi_continuous(returns_fn, torch.zeros(1, 1, 1), cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(mean).all() and -1 <= mean.item() <= 0 and torch.isfinite(best).all() and best <= 0
    mean, best = mppi_continuous(lambda plans: torch.full(plans.shape[:2], bad), torch.zeros(1, 1, 1), cfg,
                                 torch.Generator().manual_seed(0))
    assert torch.isfinite(mean).all() and best.item() == float("-inf")


@pytest.mark.parametrize("bad", NON_FINITE)
def test_codes_with_non_finite_returns_are_never_chosen(bad):
    def returns_fn(plans):  # [1, K, 1, 4]: code 3 diverges, code 1 is the best of the others
        code = plans.argmax(-1)[..., 0]
        return torch.where(code == 3, bad, -(code - 1).abs().float())

    cfg = PlannerConfig(candidates=32, iterations=3, gamma=5.0)
    probs, best = mppi_discrete(returns_fn, torch.full((1, 1, 4), 0.25), cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(probs).all() and probs.argmax().item() == 1 and best.item() == 0.0
    assert probs[0, 0, 3] < 0.25 * (1 - cfg.mix) ** (cfg.iterations - 1) + 1e-6  # only the prior's share is left
    probs, best = exhaustive_discrete(returns_fn, 1, 4, 1)
    assert probs.argmax().item() == 1 and best.item() == 0.0


def test_a_reward_that_diverges_for_some_plans_leaves_the_policy_finite():
    def reward(observations, env):  # NaN wherever the point went right
        return torch.where(observations[..., 0] > 0, float("nan"), -(observations[..., 1] - 0.5).abs())

    for moves in (None, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])):
        policy = PlanningPolicy(PointModel(moves), reward, PlannerConfig(candidates=16, iterations=3), seed=0,
                                exhaustive=False)
        action, state, _ = policy.act(np.zeros((2, 2), np.float32), np.ones(2, bool), policy.initial_state(2))
        assert np.isfinite(action).all() and torch.isfinite(state.skill).all() and torch.isfinite(state.warm).all()
        assert torch.isfinite(state.predicted_return).all()
        if moves is not None:
            assert np.all(policy.act(np.zeros((2, 2), np.float32), np.ones(2, bool), policy.initial_state(2))[2]
                          ["skill"] == 1)


# ----------------------------------------------------------------------------- settings


def test_planner_settings_are_one_section_of_the_agent_config_for_both_algorithms():
    assert AgentConfig().planner == PlannerConfig()
    keys = {key for key, _tp, _doc in iter_fields()}
    assert {f"agent.planner.{f.name}" for f in dataclasses.fields(PlannerConfig)} <= keys  # `choreo config --explain`
    assert not any(key.startswith("agent.dads.planner") for key in keys)
    for algo in ("dads", "choreographer"):
        config = load_config(["tiny"], [f"algo={algo}", "agent.planner.candidates=7", "agent.planner.hold=3"])
        assert config.agent.planner == PlannerConfig(candidates=7, hold=3)
        # Planning settings change no tensor: a snapshot is never refused for them.
        assert not any("planner" in key for key in snapshot_shape_keys(config))
    with pytest.raises(ConfigError, match="unknown config key 'agent.dads.planner"):
        load_config(["tiny"], ["algo=dads", "agent.dads.planner.candidates=7"])


def test_configs_saved_with_the_planner_under_dads_are_read_with_it_at_agent_planner(tmp_path):
    config = load_config(["tiny"], ["algo=dads", "agent.planner.candidates=7"])
    saved = to_dict(config)
    saved["agent"]["dads"]["planner"] = saved["agent"].pop("planner")  # as runs and snapshots saved it before
    assert from_dict(saved) == config
    assert from_dict(saved, ["agent.planner.hold=3"]).agent.planner == PlannerConfig(candidates=7, hold=3)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert from_yaml_file(tmp_path / "config.yaml") == config


def test_policies_default_to_the_agents_planner_settings():
    settings = PlannerConfig(hold=2, candidates=5, iterations=1)
    dads = DadsAgent((OBS,), ACTIONS, AgentConfig(dads=DadsConfig(hidden=32, prior_samples=4), planner=settings),
                     seed=0, device="cpu")
    choreographer = ChoreographerAgent((OBS,), ACTIONS,
                                       dataclasses.replace(load_config(["tiny"], []).agent, planner=settings),
                                       seed=0, device="cpu")
    reward = goal_reward(torch.zeros(1, 2))
    for policy in (DadsPlanningPolicy(dads, reward), CodebookPlanningPolicy(choreographer, reward)):
        assert policy.cfg == settings and policy.hold == 2
    for agent in (dads, choreographer):
        assert RandomSkillPolicy(agent).hold == 2


def test_the_executor_samples_or_takes_the_mean_action_as_agent_planner_execute_says(monkeypatch):
    # The same plan (same seed) executed both ways: the mean action of the stand-in actor is the
    # skill itself; a sampled action is not.
    agent = known_dads(monkeypatch)
    assert PlannerConfig().execute == "mean" and planning.execution_mode(PlannerConfig()) == "mode"
    obs = np.zeros((3, OBS), np.float32)
    out = {}
    for execute in ("sample", "mean"):
        cfg = PlannerConfig(candidates=8, iterations=2, execute=execute)
        policy = DadsPlanningPolicy(agent, goal_reward(torch.tensor([[0.3, 0.0]] * 3)), cfg, seed=0)
        action, state, _ = policy.act(obs, np.ones(3, bool), policy.initial_state(3), mode=planning.execution_mode(cfg))
        out[execute] = (action, state.skill.numpy())
    np.testing.assert_array_equal(out["sample"][1], out["mean"][1])  # one plan
    np.testing.assert_allclose(out["mean"][0], out["mean"][1].clip(-0.999, 0.999), atol=1e-5)  # the actor's clamp
    assert np.abs(out["sample"][0] - out["sample"][1]).max() > 0.05


def test_a_random_initial_mean_is_drawn_from_the_standard_normal_with_the_planners_seed(monkeypatch):
    starts = []
    mppi = planning.mppi_continuous

    def recording(returns_fn, mean, cfg, generator=None, **kwargs):
        starts.append(mean.clone())
        return mppi(returns_fn, mean, cfg, generator, **kwargs)

    monkeypatch.setattr(planning, "mppi_continuous", recording)

    def reward(observations, env):
        return -observations.square().sum(-1)

    assert PlannerConfig().initial_mean == "zero"
    cfg = PlannerConfig(horizon=2, hold=2, candidates=8, iterations=2, initial_mean="random")
    policy = PlanningPolicy(PointModel(), reward, cfg, seed=7)
    state = policy.initial_state(3)
    draws = torch.Generator().manual_seed(7)
    torch.testing.assert_close(state.warm, torch.randn(3, 2, 2, generator=draws), rtol=0, atol=0)
    # an episode's first plan starts from a fresh draw of the same stream; after it, the appended
    # segment is a draw too (one per environment)
    _, state, _ = policy.act(np.zeros((3, 2), np.float32), np.ones(3, bool), state)
    torch.testing.assert_close(starts[0], torch.randn(3, 2, 2, generator=draws), rtol=0, atol=0)
    fresh = state.warm[:, 1]
    assert fresh.abs().min() > 0 and not torch.equal(fresh[0], fresh[1])
    # the prior's centre, the default: zeros throughout
    zero = PlanningPolicy(PointModel(), reward, dataclasses.replace(cfg, initial_mean="zero"), seed=7)
    _, state, _ = zero.act(np.zeros((3, 2), np.float32), np.ones(3, bool), zero.initial_state(3))
    assert torch.equal(starts[1], torch.zeros(3, 2, 2)) and torch.equal(state.warm[:, 1], torch.zeros(3, 2))
