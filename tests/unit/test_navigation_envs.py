"""Navigation tasks: point-mass dynamics, Ant x-y, goals, goal rewards, `info["xy"]`, the
normalised distance metric, and gym keyword arguments for DADS's x-y prior."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from choreo.actors.config import EnvConfig
from choreo.actors.envs import NAV_IDS, env_spec, make_env, make_env_from_config, normalised_distance
from choreo.actors.envs.gym_adapter import parse_gym_kwargs
from choreo.actors.envs.navigation import goal_reward

GOAL_RANGE = {"point_mass_nav": 10.0, "ant_nav": 15.0}


def _actions(env: gymnasium.Env, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *env.action_space.shape)).astype(np.float32)


# ------------------------------------------------------------------------------------ point mass


def test_point_mass_steps_as_its_dynamics_say():
    env = make_env("point_mass_nav", seed=0)
    obs, info = env.reset()
    np.testing.assert_array_equal(obs, np.zeros(4, np.float32))
    a = np.array([1.0, -0.5], np.float32)  # acceleration 5 * a: [5, -2.5] units/s^2
    obs = env.step(a)[0]
    # v = 0.9 * 0 + 0.1 * [5, -2.5]; p = 0 + 0.1 * v
    np.testing.assert_allclose(obs, [0.05, -0.025, 0.5, -0.25], rtol=1e-6)
    obs = env.step(a)[0]
    # v = 0.9 * [0.5, -0.25] + [0.5, -0.25] = [0.95, -0.475]; p = [0.05, -0.025] + 0.1 * v
    np.testing.assert_allclose(obs, [0.145, -0.0725, 0.95, -0.475], rtol=1e-6)
    obs = env.step(np.array([3.0, 0.0], np.float32))[0]  # clipped to 1
    np.testing.assert_allclose(obs[2:], [0.9 * 0.95 + 0.5, 0.9 * -0.475], rtol=1e-6)


def test_point_mass_action_repeat_runs_frames():
    one = make_env("point_mass_nav", seed=0, action_repeat=1)
    two = make_env("point_mass_nav", seed=0, action_repeat=2)
    one.reset()
    two.reset()
    for a in _actions(one, 5):
        one.step(a)
        o1 = one.step(a)[0]
        np.testing.assert_array_equal(two.step(a)[0], o1)


def test_point_mass_stays_in_arena():
    env = make_env("point_mass_nav", seed=0)
    env.reset()
    for _ in range(60):  # full thrust to +x for 6 s: far more than the 10 units to the wall
        obs, *_ = env.step(np.array([1.0, 0.2], np.float32))
    assert obs[0] == 10.0 and obs[2] == 0.0  # stopped at the wall
    assert 0 < obs[1] < 10 and obs[3] > 0  # the other axis moves on
    obs = env.step(np.array([-1.0, 0.2], np.float32))[0]
    assert obs[0] < 10.0 and obs[2] < 0.0  # leaves the wall
    env.reset(seed=1)
    xs = np.array([env.step(a)[0] for a in np.sign(_actions(env, 200, seed=1))])
    assert np.all(np.abs(xs[:, :2]) <= 10.0)


def test_point_mass_episode_length():
    for action_repeat, expected in ((1, 200), (2, 100)):
        env = make_env("point_mass_nav", seed=0, action_repeat=action_repeat)
        assert env.unwrapped.max_episode_steps == expected == env_spec("point_mass_nav").episode_length(action_repeat)
        env.reset()
        flags = [env.step(a)[2:4] for a in _actions(env, expected)]
        assert flags == [(False, False)] * (expected - 1) + [(False, True)]


def test_point_mass_pixels_show_agent_and_goal_upright():
    env = make_env("point_mass_nav", "pixels", seed=0)
    assert env.unwrapped.action_repeat == 2
    env.reset()
    env.unwrapped.set_goal([-6.0, 7.0])
    obs = env.step(np.zeros(2, np.float32))[0].transpose(1, 2, 0).astype(int)
    green = np.argwhere((obs[..., 1] > 150) & (obs[..., 0] < 100))
    red = np.argwhere((obs[..., 0] > 180) & (obs[..., 1] < 100))
    # 64 pixels over 20 units: x = -6 is column 12.8, y = 7 is row 9.6 (row 0 at the top).
    np.testing.assert_allclose(green.mean(0), [9.6 - 0.5, 12.8 - 0.5], atol=0.6)
    np.testing.assert_allclose(red.mean(0), [31.5, 31.5], atol=0.6)  # the agent at the origin
    assert len(green) > len(red) > 0  # goal disc radius 1, agent 0.6


# ------------------------------------------------------------------------------------ both tasks


@pytest.mark.parametrize("task", NAV_IDS)
def test_observation_xy_first_and_info_xy(task):
    env = make_env(task, seed=0)
    nav = env.unwrapped
    assert nav.xy_indices == (0, 1)
    obs, info = env.reset()
    assert info["xy"].shape == (2,) and info["xy"].dtype == np.float64
    np.testing.assert_allclose(obs[:2], info["xy"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(info["goal"], nav.goal)
    start = info["xy"]
    for a in _actions(env, 20):
        obs, _, _, _, info = env.step(a)
        np.testing.assert_allclose(obs[:2], info["xy"], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(info["goal"], nav.goal)
    assert np.linalg.norm(info["xy"] - start) > 1e-3
    env.close()


@pytest.mark.parametrize("task", NAV_IDS)
def test_goals_drawn_in_range_and_seeded(task):
    def goals(env, n, seed=None):
        out = [env.reset(seed=seed)[1]["goal"]]
        out += [env.reset()[1]["goal"] for _ in range(n - 1)]
        for goal in out:
            assert goal.shape == (2,) and goal.dtype == np.float64
        return np.array(out)

    a, b, c = (make_env(task, seed=s) for s in (5, 5, 6))
    ga, gb, gc = goals(a, 30), goals(b, 30), goals(c, 30)
    r = GOAL_RANGE[task]
    assert np.all(np.abs(ga) <= r) and np.abs(ga).max() > 0.5 * r
    assert len(np.unique(ga, axis=0)) == 30  # a new goal every reset
    np.testing.assert_array_equal(ga, gb)
    assert not np.allclose(ga[0], gc[0])
    np.testing.assert_array_equal(goals(c, 3, seed=5), ga[:3])  # reset(seed=...) reseeds
    _, info = a.reset(seed=5)
    np.testing.assert_array_equal(a.unwrapped.goal, info["goal"])
    np.testing.assert_array_equal(info["goal"], ga[0])
    for env in (a, b, c):
        env.close()


@pytest.mark.parametrize("task", NAV_IDS)
def test_set_goal_fixes_the_goal(task):
    fixed, free = make_env(task, seed=3), make_env(task, seed=3)
    fixed.reset()
    free.reset()
    fixed.unwrapped.set_goal([4.0, -2.0])
    np.testing.assert_array_equal(fixed.unwrapped.goal, [4.0, -2.0])  # at once
    _, reward, *_ = fixed.step(np.zeros(fixed.action_space.shape, np.float32))
    assert reward == pytest.approx(float(fixed.unwrapped.goal_reward(fixed.unwrapped.current_xy())))
    for _ in range(3):
        _, info = fixed.reset()
        free.reset()
        np.testing.assert_array_equal(info["goal"], [4.0, -2.0])
        np.testing.assert_array_equal(fixed.unwrapped.goal, [4.0, -2.0])
    fixed.unwrapped.set_goal(None)  # back to drawing, on the same stream as if never fixed
    np.testing.assert_array_equal(fixed.reset()[1]["goal"], free.reset()[1]["goal"])
    with pytest.raises(ValueError, match="goal"):
        fixed.unwrapped.set_goal([1.0, 2.0, 3.0])
    fixed.close()
    free.close()


def test_goal_reward_hand_values_and_shapes():
    goal = np.array([1.0, 2.0])
    assert goal_reward([4.0, 6.0], goal) == pytest.approx(-5.0)
    assert goal_reward([1.0, 2.0], goal) == 0.0
    sparse = goal_reward([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0], [3.1, 2.0]], goal, "sparse", radius=2.0)
    np.testing.assert_array_equal(sparse, [1.0, 1.0, 1.0, 0.0])  # the boundary counts
    assert sparse.dtype == np.float64
    xy = np.random.default_rng(0).normal(size=(5, 7, 2))
    assert goal_reward(xy, goal).shape == (5, 7)
    assert goal_reward(xy, np.zeros((5, 7, 2))).shape == (5, 7)
    assert goal_reward(xy, np.zeros((7, 2)), "sparse").shape == (5, 7)
    np.testing.assert_allclose(goal_reward(xy, goal), -np.linalg.norm(xy - goal, axis=-1))
    with pytest.raises(ValueError, match="dense"):
        goal_reward(xy, goal, "shaped")
    with pytest.raises(ValueError, match="size 2"):
        goal_reward(np.zeros((4, 3)), goal)


@pytest.mark.parametrize("task,radius", [("point_mass_nav", 1.0), ("ant_nav", 1.5)])
def test_env_goal_reward_kinds_and_default_radius(task, radius):
    dense = make_env(task, seed=0)
    sparse = make_env(task, seed=0, goal_reward="sparse")
    wide = make_env(task, seed=0, goal_reward="sparse", goal_radius=4.0)
    assert dense.unwrapped.goal_radius == sparse.unwrapped.goal_radius == radius
    assert wide.unwrapped.goal_radius == 4.0
    xy = np.array([[3.0, 4.0], [0.5, 0.0], [1.4, 0.0], [0.0, 3.9]])
    goal = np.zeros(2)
    np.testing.assert_allclose(dense.unwrapped.goal_reward(xy, goal), [-5.0, -0.5, -1.4, -3.9])
    np.testing.assert_array_equal(sparse.unwrapped.goal_reward(xy, goal), [0.0, 1.0, float(radius > 1.4), 0.0])
    np.testing.assert_array_equal(wide.unwrapped.goal_reward(xy, goal), [0.0, 1.0, 1.0, 1.0])
    wide.reset()
    assert wide.unwrapped.goal_reward(xy).shape == (4,)  # default: the current goal
    np.testing.assert_allclose(
        dense.unwrapped.goal_reward(xy, wide.unwrapped.goal), -np.linalg.norm(xy - wide.unwrapped.goal, axis=-1)
    )
    for env in (dense, sparse, wide):
        env.close()


@pytest.mark.parametrize("task", NAV_IDS)
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_step_reward_is_goal_reward_of_the_real_position(task, kind):
    env = make_env(task, seed=0, goal_reward=kind, goal_radius=0.0 if kind == "dense" else 2.0)
    env.reset()
    env.unwrapped.set_goal([0.3, -0.2])  # near the start, so that sparse rewards happen
    rewards, successes = [], []
    for a in _actions(env, 30):
        _, reward, _, _, info = env.step(a)
        expected = float(env.unwrapped.goal_reward(info["xy"], env.unwrapped.goal))
        assert isinstance(reward, float) and reward == pytest.approx(expected, abs=1e-12)
        rewards.append(reward)
        successes.append(info["success"])
    if kind == "sparse":
        assert set(rewards) <= {0.0, 1.0} and 1.0 in rewards
        assert successes == rewards
    else:
        assert all(r <= 0 for r in rewards)
    env.close()


def test_step_reward_summed_over_action_repeat():
    one = make_env("point_mass_nav", seed=0, action_repeat=1)
    two = make_env("point_mass_nav", seed=0, action_repeat=2)
    one.reset()
    two.reset()
    for a in _actions(one, 10):
        r = one.step(a)[1] + one.step(a)[1]
        assert two.step(a)[1] == pytest.approx(r, rel=1e-12)


def test_bad_navigation_arguments():
    with pytest.raises(ValueError, match="goal_reward"):
        make_env("point_mass_nav", goal_reward="shaped")
    with pytest.raises(ValueError, match="goal_radius"):
        make_env("point_mass_nav", goal_radius=-1.0)
    with pytest.raises(ValueError, match="gym_kwargs"):
        make_env("ant_nav", gym_kwargs=["reset_noise_scale=0"])


# ------------------------------------------------------------------------------------ metric


def test_normalised_distance():
    goal = np.array([4.0, 0.0])
    assert normalised_distance(np.zeros((11, 2)), goal) == 1.0  # standing still
    at_goal = np.array([[0.0, 0.0]] + [[4.0, 0.0]] * 5)
    assert normalised_distance(at_goal, goal) == 0.0
    # distances 4 | 2, 0, 3: (2 + 0 + 3) / 3 / 4
    xys = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [4.0, 3.0]])
    assert normalised_distance(xys, goal) == pytest.approx(5 / 12)
    away = np.array([[1.0, 0.0], [-1.0, 0.0]])  # start 3 away, end 5 away
    assert normalised_distance(away, goal) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="starts at the goal"):
        normalised_distance(np.array([[4.0, 0.0], [3.0, 0.0]]), goal)
    with pytest.raises(ValueError, match=r"\[T\+1, 2\]"):
        normalised_distance(np.zeros((1, 2)), goal)
    with pytest.raises(ValueError, match=r"\[T\+1, 2\]"):
        normalised_distance(np.zeros((5, 3)), goal)


# ------------------------------------------------------------------------------------ Ant


def test_ant_xy_is_the_torso_position():
    env = make_env("ant_nav", seed=0)
    assert env.observation_space.shape == (29,) and env.action_space.shape == (8,)
    obs, info = env.reset()
    data = env.unwrapped.inner.unwrapped.data
    np.testing.assert_allclose(obs, np.concatenate([data.qpos, data.qvel]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(info["xy"], data.qpos[:2])
    start = data.qpos[:2].copy()
    for a in _actions(env, 25):
        obs, _, terminated, _, info = env.step(a)
        assert not terminated
        np.testing.assert_array_equal(info["xy"], data.qpos[:2])
        np.testing.assert_allclose(obs[:2], data.qpos[:2], rtol=1e-6, atol=1e-7)
    assert np.linalg.norm(data.qpos[:2] - start) > 1e-2  # it moved
    env.close()


def test_ant_initial_state_is_ant_v5s_for_the_same_seed():
    nav = make_env("ant_nav", seed=4)
    gym = make_env("gym:Ant-v5", seed=4, gym_kwargs=[
        "exclude_current_positions_from_observation=false", "include_cfrc_ext_in_observation=false",
    ])  # fmt: skip
    np.testing.assert_array_equal(nav.reset()[0], gym.reset()[0])
    nav.close()
    gym.close()


@pytest.mark.parametrize("action_repeat,expected", [(1, 200), (2, 100)])
def test_ant_episode_length_and_no_termination(action_repeat, expected):
    env = make_env("ant_nav", seed=0, action_repeat=action_repeat)
    assert env.unwrapped.max_episode_steps == expected == env_spec("ant_nav").episode_length(action_repeat)
    env.reset()
    flip = np.ones(8, np.float32)  # flailing, possibly onto its back: no termination
    flags = [env.step(flip * (-1) ** (t // 10))[2:4] for t in range(expected)]
    assert flags == [(False, False)] * (expected - 1) + [(False, True)]
    env.close()


# ------------------------------------------------------------------------------------ config and gym kwargs


def test_make_env_from_config_navigation():
    cfg = EnvConfig(task="point_mass_nav", goal_reward="sparse", goal_radius=2.5)
    env = make_env_from_config(cfg, seed=0)
    assert env.unwrapped.goal_reward_kind == "sparse" and env.unwrapped.goal_radius == 2.5
    assert env.unwrapped.max_episode_steps == 200


def test_gym_ant_xy_prior_through_config():
    cfg = EnvConfig(task="gym:Ant-v5", gym_kwargs=("exclude_current_positions_from_observation=false",))
    env = make_env_from_config(cfg, seed=0)
    obs, _ = env.reset()
    data = env.unwrapped.inner.unwrapped.data
    assert obs.shape == (107,)  # qpos 15 + qvel 14 + contact forces 78
    for a in _actions(env, 5):
        obs = env.step(a)[0]
        np.testing.assert_allclose(obs[:2], data.qpos[:2], rtol=1e-6, atol=1e-7)
    env.close()
    plain = make_env("gym:Ant-v5", seed=0)
    assert plain.observation_space.shape == (105,)  # x, y excluded by default
    plain.close()


def test_parse_gym_kwargs():
    parsed = parse_gym_kwargs(["a=false", "b = 3", "c=0.5", "d=1e-3", "e=[1, 2]", "f=track", "g="])
    assert parsed == {"a": False, "b": 3, "c": 0.5, "d": 1e-3, "e": [1, 2], "f": "track", "g": None}
    assert parse_gym_kwargs(()) == {} and parse_gym_kwargs({"x": 1}) == {"x": 1}
    with pytest.raises(ValueError, match="name=value"):
        parse_gym_kwargs(["novalue"])
    with pytest.raises(ValueError, match="twice"):
        parse_gym_kwargs(["a=1", "a=2"])
    with pytest.raises(ValueError, match="render_mode"):
        parse_gym_kwargs(["render_mode=human"])
    with pytest.raises(ValueError, match="no_such_argument"):
        make_env("gym:Pendulum-v1", gym_kwargs=["no_such_argument=1"])


def test_gymnasium_make_navigation_ids():
    env = gymnasium.make("choreo/point_mass_nav", goal_reward="sparse", goal_radius=3.0)
    obs, info = env.reset(seed=0)
    assert obs.shape == (4,) and env.unwrapped.goal_radius == 3.0 and "xy" in info
    env.close()
