"""Environment layer: spaces, episode lengths, action repeat, seeding, pixels, gym ids, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest

from choreo.actors.config import EnvConfig
from choreo.actors.envs import (
    ENV_IDS,
    METAWORLD_IDS,
    URLB_IDS,
    env_spec,
    make_env,
    make_env_from_config,
    metaworld_goals,
    register_envs,
)

# Tasks whose first observation depends on the seed.
RANDOM_INIT = ("walker_walk", "walker_flip", "quadruped_stand", "quadruped_jump", "jaco_reach_top_left")


def _rollout(env: gymnasium.Env, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        out.append(env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)))
    return out


# ------------------------------------------------------------------------------------ spaces


@pytest.mark.parametrize("task", ENV_IDS)
def test_states_spaces_and_default_action_repeat(task):
    spec = env_spec(task)
    env = make_env(task, "states", seed=0)
    try:
        assert env.action_space == gymnasium.spaces.Box(-1, 1, (spec.action_dim,), np.float32)
        assert env.observation_space.shape == (spec.state_dim,)
        assert env.observation_space.dtype == np.float32
        assert env.unwrapped.action_repeat == (2 if task in METAWORLD_IDS else 1)
        assert env.unwrapped.max_episode_steps == spec.episode_length(env.unwrapped.action_repeat)
        obs, info = env.reset(seed=0)
        assert obs.shape == (spec.state_dim,) and obs.dtype == np.float32
        assert np.all(np.isfinite(obs))
        for ob, reward, terminated, truncated, info in _rollout(env, 3):
            assert ob.shape == (spec.state_dim,) and ob.dtype == np.float32
            assert isinstance(reward, float) and np.isfinite(reward)
            assert terminated is False and truncated is False
            assert ("success" in info) == spec.has_success
    finally:
        env.close()


def _mujoco_model(env: gymnasium.Env, task: str):
    """The MuJoCo model that renders `task`'s pixels (None: point_mass_nav draws them with numpy)."""
    if task in METAWORLD_IDS:
        return env.unwrapped.unwrapped_metaworld.model
    if task == "point_mass_nav":
        return None
    if task == "ant_nav":
        return env.unwrapped.inner.unwrapped.model
    return env.unwrapped.physics.model


@pytest.mark.parametrize("task", ENV_IDS)
def test_pixels_every_id(task):
    spec = env_spec(task)
    env = make_env(task, "pixels", seed=0)
    try:
        assert env.observation_space == gymnasium.spaces.Box(0, 255, (3, 64, 64), np.uint8)
        assert env.unwrapped.action_repeat == 2
        assert env.unwrapped.max_episode_steps == spec.episode_length_ar2
        obs, _ = env.reset(seed=0)
        assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8
        assert obs.astype(np.float64).var() > 10.0, "blank image"
        (ob, *_), = _rollout(env, 1)
        assert ob.shape == (3, 64, 64) and ob.dtype == np.uint8
        assert ob.astype(np.float64).var() > 10.0
        # Rendering quality was lowered before the first render (shadows and MSAA off).
        model = _mujoco_model(env, task)
        if model is not None:
            assert model.vis.quality.shadowsize == 0 and model.vis.quality.offsamples == 0
    finally:
        env.close()


def test_pixel_image_size():
    env = make_env("walker_walk", "pixels", image_size=32)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 32, 32) and env.observation_space.shape == (3, 32, 32)


def test_env_spec_values():
    assert env_spec("walker_flip").episode_length_ar1 == 1000 and env_spec("walker_flip").episode_length_ar2 == 500
    assert env_spec("quadruped_jump").episode_length_ar1 == 1000 and env_spec("quadruped_jump").episode_length_ar2 == 500
    jaco = env_spec("jaco_reach_bottom_right")
    assert (jaco.episode_length_ar1, jaco.episode_length_ar2, jaco.has_success, jaco.domain) == (250, 125, True, "jaco")
    mw = env_spec("mw_reach")
    assert mw.episode_length(2) == 250 and mw.has_success and mw.domain == "metaworld"
    assert not env_spec("walker_walk").has_success and env_spec("walker_walk").supports_pixels
    with pytest.raises(ValueError, match="walker_wlak"):
        env_spec("walker_wlak")


def test_unknown_id_names_it_and_suggests():
    with pytest.raises(ValueError) as e:
        make_env("walker_wlak")
    msg = str(e.value)
    assert "'walker_wlak'" in msg and "did you mean 'walker_walk'" in msg
    assert all(task in msg for task in ENV_IDS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="obs"):
        make_env("walker_walk", obs="rgb")
    with pytest.raises(ValueError, match="action_repeat"):
        make_env("walker_walk", action_repeat=0)
    with pytest.raises(ValueError, match="goal_index"):
        make_env("mw_reach", goal_index=50)


# ------------------------------------------------------------------------------------ episodes


@pytest.mark.parametrize("task", URLB_IDS + METAWORLD_IDS)
@pytest.mark.parametrize("action_repeat", [1, 2])
def test_full_episode_length_states(task, action_repeat):
    expected = {"walker": 1000, "quadruped": 1000, "jaco": 250, "metaworld": 500}[env_spec(task).domain]
    expected = -(-expected // action_repeat)
    env = make_env(task, "states", seed=0, action_repeat=action_repeat)
    env.reset(seed=0)
    zero = np.zeros(env.action_space.shape, np.float32)
    steps = 0
    while True:
        _, _, terminated, truncated, _ = env.step(zero)
        steps += 1
        assert terminated is False
        if truncated:
            break
        assert steps < expected
    assert steps == expected
    with pytest.raises(RuntimeError, match="reset"):
        env.step(zero)
    env.reset()
    assert env.step(zero)[3] is False
    env.close()


def test_full_episode_pixels_jaco():
    env = make_env("jaco_reach_top_right", "pixels", seed=0)
    env.reset(seed=0)
    results = _rollout(env, 125)
    assert [r[3] for r in results] == [False] * 124 + [True]
    assert not any(r[2] for r in results)
    env.close()


def test_shortened_episode_truncates_in_agent_steps():
    env = make_env("quadruped_walk", "pixels", seed=0)
    env.reset(seed=0)
    env.unwrapped._max_episode_steps = 3
    flags = [(r[2], r[3]) for r in _rollout(env, 3)]
    assert flags == [(False, False), (False, False), (False, True)]
    env.close()


# ------------------------------------------------------------------------------------ actions


def test_actions_scaled_to_native_bounds_and_clipped():
    env = make_env("quadruped_walk", "states", seed=0)  # asymmetric bounds, e.g. [-1, 1.1]
    env.reset(seed=0)
    physics = env.unwrapped.physics
    low, high = physics.model.actuator_ctrlrange.T
    assert np.any(low != -high)
    env.step(np.ones(12, np.float32))
    np.testing.assert_allclose(physics.data.ctrl, high)
    env.step(np.full(12, -3.0, np.float32))  # out of range: clipped to -1
    np.testing.assert_allclose(physics.data.ctrl, low)
    env.step(np.zeros(12, np.float32))
    np.testing.assert_allclose(physics.data.ctrl, (low + high) / 2)

    jaco = make_env("jaco_reach_top_left", "states", seed=0)
    jaco.reset(seed=0)
    jaco.step(np.ones(9, np.float32))
    np.testing.assert_allclose(jaco.unwrapped.physics.data.ctrl[:6], [0.2 * np.pi] * 3 + [0.8 / 3 * np.pi] * 3)
    np.testing.assert_allclose(jaco.unwrapped.physics.data.ctrl[6:], [5.0] * 3)


def test_rewards_summed_over_action_repeat():
    one = make_env("walker_walk", "states", seed=3, action_repeat=1)
    two = make_env("walker_walk", "states", seed=3, action_repeat=2)
    o1, _ = one.reset()
    o2, _ = two.reset()
    np.testing.assert_array_equal(o1, o2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.uniform(-1, 1, 6).astype(np.float32)
        r_a = one.step(a)[1]
        o1, r_b, *_ = one.step(a)
        o2, r2, *_ = two.step(a)
        assert r_a > 0 and r_b > 0
        assert r2 == pytest.approx(r_a + r_b, rel=1e-12)
        np.testing.assert_array_equal(o1, o2)


def test_metaworld_reward_counts_successful_frames():
    from metaworld.policies import SawyerReachV3Policy

    goals = metaworld_goals(1)
    index = int(np.argmax(goals[:, 1]))  # a goal well inside the arm's reach
    env = make_env("mw_reach", "states", seed=0, goal_index=index)
    obs, _ = env.reset()
    policy = SawyerReachV3Policy()
    rewards = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(120):
            obs, reward, _, _, info = env.step(policy.get_action(obs.astype(np.float64)))
            rewards.append(reward)
            assert info["success"] == float(reward > 0)
    assert set(rewards) <= {0.0, 1.0, 2.0}
    assert rewards[0] == 0.0 and rewards[-1] == 2.0


# ------------------------------------------------------------------------------------ custom rewards


def _set_state(physics, qpos=None, qvel=None, **named_qvel):
    with physics.reset_context():
        physics.data.qpos[:] = 0 if qpos is None else qpos
        physics.data.qvel[:] = 0 if qvel is None else qvel
        for name, value in named_qvel.items():
            physics.named.data.qvel[name] = value


def test_walker_upright_standing_gets_stand_reward():
    env = make_env("walker_stand", seed=0)
    env.reset(seed=0)
    physics = env.unwrapped.physics
    _set_state(physics)  # all joints 0: upright, torso at 1.3 m
    assert physics.torso_height() > 1.2 and physics.torso_upright() == pytest.approx(1.0)
    assert env.unwrapped.reward() == pytest.approx(1.0)
    qpos = np.zeros(physics.model.nq)
    qpos[physics.model.name2id("rooty", "joint")] = np.pi / 2  # lying flat
    qpos[physics.model.name2id("rootz", "joint")] = -1.0
    _set_state(physics, qpos=qpos)
    assert env.unwrapped.reward() < 0.5


def test_walker_flip_reward_grows_with_angular_momentum():
    env = make_env("walker_flip", seed=0)
    env.reset(seed=0)
    physics = env.unwrapped.physics
    rewards, momenta = [], []
    for spin in (0.0, 0.1, 0.3, 0.5, 2.0):
        _set_state(physics, rooty=spin)  # standing upright (stand reward 1), spinning forward
        momenta.append(float(physics.named.data.subtree_angmom["torso"][1]))
        rewards.append(env.unwrapped.reward())
    assert rewards[0] == pytest.approx(1 / 6)
    assert all(b > a for a, b in zip(rewards[:4], rewards[1:4]))
    assert rewards[-1] == pytest.approx(1.0) and momenta[-1] > 5
    for m, r in zip(momenta[:4], rewards[:4]):  # linear ramp: (5 * L/5 + 1) / 6 for L in [0, 5]
        assert m < 5 and r == pytest.approx((m + 1) / 6)
    _set_state(physics, rooty=-2.0)  # spinning backwards earns nothing extra
    assert env.unwrapped.reward() == pytest.approx(1 / 6)


def _quadruped_pose(physics, quat, com_target=None):
    qpos = np.zeros(physics.model.nq)
    qpos[3:7] = quat
    _set_state(physics, qpos=qpos)
    if com_target is not None:
        from choreo.actors.envs.dmc import com_height

        qpos[2] += com_target - com_height(physics)
        _set_state(physics, qpos=qpos)


def test_quadruped_stand_and_jump_rewards():
    from choreo.actors.envs.dmc import com_height

    stand = make_env("quadruped_stand", seed=0)
    stand.reset(seed=0)
    physics = stand.unwrapped.physics
    _quadruped_pose(physics, [1, 0, 0, 0], com_target=0.6)
    assert stand.unwrapped.reward() == pytest.approx(1.0)
    _quadruped_pose(physics, [0, 1, 0, 0], com_target=0.6)  # upside down
    assert stand.unwrapped.reward() == pytest.approx(0.0, abs=1e-9)

    jump = make_env("quadruped_jump", seed=0)
    jump.reset(seed=0)
    physics = jump.unwrapped.physics
    _quadruped_pose(physics, [1, 0, 0, 0], com_target=0.5)
    assert com_height(physics) == pytest.approx(0.5)
    assert jump.unwrapped.reward() == pytest.approx(0.75)  # linear, 0.5 at the 1 m margin
    _quadruped_pose(physics, [1, 0, 0, 0], com_target=1.2)
    assert jump.unwrapped.reward() == pytest.approx(1.0)
    _quadruped_pose(physics, [0, 1, 0, 0], com_target=1.2)
    assert jump.unwrapped.reward() == pytest.approx(0.0, abs=1e-9)


def test_quadruped_stand_starts_in_random_orientation():
    env = make_env("quadruped_stand", seed=0)
    quats = []
    for seed in range(3):
        env.reset(seed=seed)
        quats.append(np.array(env.unwrapped.physics.named.data.qpos["root"][3:]))
    assert not np.allclose(quats[0], quats[1]) and not np.allclose(quats[1], quats[2])


@pytest.mark.parametrize(
    "task,xy",
    [
        ("jaco_reach_top_left", (-0.09, 0.09)),
        ("jaco_reach_top_right", (0.09, 0.09)),
        ("jaco_reach_bottom_left", (-0.09, -0.09)),
        ("jaco_reach_bottom_right", (0.09, -0.09)),
    ],
)
def test_jaco_target_positions(task, xy):
    env = make_env(task, seed=0)
    env.reset(seed=0)
    target = env.unwrapped.composer_task.target_position(env.unwrapped.physics)
    np.testing.assert_allclose(target[:2], xy, atol=1e-3)
    assert abs(target[2]) < 0.01


def test_jaco_reward_on_and_off_target():
    env = make_env("jaco_reach_top_left", seed=0)
    env.reset(seed=0)
    task, physics = env.unwrapped.composer_task, env.unwrapped.physics
    assert env.unwrapped.reward() < 1e-6  # starts away from the target
    tcp = task.tcp_position(physics)
    task.prop.set_pose(physics, position=tcp)
    physics.forward()
    assert task.distance(physics) == pytest.approx(0.0, abs=1e-9)
    assert env.unwrapped.reward() == 1.0
    _, reward, _, _, info = env.step(np.zeros(9, np.float32))  # the brick falls less than 5 cm
    assert reward == 1.0 and info["success"] == 1.0
    task.prop.set_pose(physics, position=tcp + np.array([0.3, 0.0, 0.0]))
    physics.forward()
    assert env.unwrapped.reward() < 1e-6
    task.prop.set_pose(physics, position=tcp + np.array([0.07, 0.0, 0.0]))
    physics.forward()
    assert 0.1 < env.unwrapped.reward() < 1.0  # inside the margin: partial reward


# ------------------------------------------------------------------------------------ seeding


@pytest.mark.parametrize("task", RANDOM_INIT)
def test_seeding(task):
    a, b, c = (make_env(task, seed=s) for s in (7, 7, 8))
    oa, ob, oc = a.reset()[0], b.reset()[0], c.reset()[0]
    np.testing.assert_array_equal(oa, ob)
    assert not np.array_equal(oa, oc)
    np.testing.assert_array_equal(a.step(np.full(a.action_space.shape, 0.3, np.float32))[0],
                                  b.step(np.full(b.action_space.shape, 0.3, np.float32))[0])  # fmt: skip
    second = a.reset()[0]
    assert not np.array_equal(second, oa)  # the generator moves on between episodes
    np.testing.assert_array_equal(a.reset(seed=7)[0], oa)  # reset(seed=...) reseeds
    np.testing.assert_array_equal(c.reset(seed=7)[0], oa)


# ------------------------------------------------------------------------------------ Meta-World


def test_metaworld_goal_sets():
    sets = {s: metaworld_goals(s) for s in (1, 2, 3)}
    for goals in sets.values():
        assert goals.shape == (50, 3)
        assert np.all(goals >= [-0.45, 0.3, 0.1]) and np.all(goals <= [0.45, 0.9, 0.5])
        assert len(np.unique(goals, axis=0)) == 50
    assert not np.allclose(sets[1], sets[2]) and not np.allclose(sets[2], sets[3])
    np.testing.assert_array_equal(metaworld_goals(2), sets[2])
    expected = np.random.default_rng(3).uniform([-0.45, 0.3, 0.1], [0.45, 0.9, 0.5], (50, 3))
    np.testing.assert_array_equal(sets[3], expected)


@pytest.mark.parametrize("goal_set,goal_index", [(1, 0), (2, 17), (3, 49)])
def test_metaworld_env_goal_is_selected_goal(goal_set, goal_index):
    goal = metaworld_goals(goal_set)[goal_index]
    env = make_env("mw_reach", "states", goal_set=goal_set, goal_index=goal_index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checker or other warnings from Meta-World
        obs, info = env.reset()
        np.testing.assert_allclose(env.unwrapped.unwrapped_metaworld._target_pos, goal)
        np.testing.assert_allclose(obs[-3:], goal, atol=1e-6)
        np.testing.assert_allclose(info["goal"], goal)
        for ob, *_ in _rollout(env, 3):  # not clipped to reach-v3's own, smaller goal box
            np.testing.assert_allclose(ob[-3:], goal, atol=1e-6)
    env.close()


def test_metaworld_pixels_are_flipped_upright():
    import mujoco

    env = make_env("mw_reach", "pixels", seed=0)
    obs, _ = env.reset()
    mw = env.unwrapped.unwrapped_metaworld
    renderer = mujoco.Renderer(mw.model, 64, 64)
    renderer.update_scene(mw.data, camera="corner4")
    raw = renderer.render()  # MuJoCo's image of this camera is upside down
    renderer.close()
    np.testing.assert_array_equal(obs.transpose(1, 2, 0), raw[::-1])
    assert not np.array_equal(raw, raw[::-1])
    env.close()


def test_make_env_from_config():
    cfg = EnvConfig(task="mw_reach", obs="states", action_repeat=2, goal_set=2, goal_index=7)
    env = make_env_from_config(cfg, seed=0)
    assert env.unwrapped.action_repeat == 2
    np.testing.assert_allclose(env.unwrapped.goal, metaworld_goals(2)[7])
    env.close()
    env = make_env_from_config(EnvConfig(task="quadruped_run", obs="states", action_repeat=2), seed=1)
    assert env.unwrapped.action_repeat == 2 and env.unwrapped.max_episode_steps == 500
    assert env.observation_space.shape == (78,)


# ------------------------------------------------------------------------------------ gym ids


def test_gym_pendulum():
    env = make_env("gym:Pendulum-v1", seed=0)
    assert env.action_space == gymnasium.spaces.Box(-1, 1, (1,), np.float32)
    np.testing.assert_allclose(env.unwrapped.native_action(np.array([1.0])), [2.0])  # Pendulum torque is [-2, 2]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3,) and obs.dtype == np.float32
    results = _rollout(env, 200)
    assert [r[3] for r in results] == [False] * 199 + [True] and not any(r[2] for r in results)
    assert all(r[0].dtype == np.float32 for r in results)
    two = make_env("gym:Pendulum-v1", seed=0, action_repeat=2)
    assert two.unwrapped.max_episode_steps == 100
    assert env_spec("gym:Pendulum-v1").episode_length_ar2 == 100


def test_gym_reward_sum_and_termination():
    one = make_env("gym:InvertedPendulum-v5", seed=0, action_repeat=1)
    two = make_env("gym:InvertedPendulum-v5", seed=0, action_repeat=2)
    one.reset(seed=0)
    two.reset(seed=0)
    a = np.full(1, 0.5, np.float32)
    assert two.step(a)[1] == one.step(a)[1] + one.step(a)[1] == 2.0
    terminated = False
    for _ in range(200):  # a constant push topples the pole
        _, _, terminated, truncated, _ = two.step(np.ones(1, np.float32))
        if terminated:
            break
    assert terminated and not truncated


def test_gym_pixels():
    env = make_env("gym:InvertedPendulum-v5", "pixels", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and obs.astype(float).var() > 10
    env.close()


def test_resize_nearest():
    from choreo.actors.envs.gym_adapter import resize_nearest

    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    small = resize_nearest(image, 4)
    assert small.shape == (4, 4, 3)
    np.testing.assert_array_equal(small, image[1::2, 1::2])
    np.testing.assert_array_equal(resize_nearest(image, 16)[::2, ::2], image)


def test_gym_discrete_action_space_is_rejected():
    with pytest.raises(ValueError, match=r"gym:CartPole-v1.*Discrete\(2\)"):
        make_env("gym:CartPole-v1")


def test_gym_unknown_id():
    with pytest.raises(ValueError, match="gym:Pendulum-v1"):
        make_env("gym:Pendulum-v9")


# ------------------------------------------------------------------------------------ registry


def test_gymnasium_registration():
    register_envs()  # idempotent
    assert all("choreo/" + task in gymnasium.registry for task in ENV_IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gymnasium.make("choreo/walker_walk")
        obs, _ = env.reset(seed=0)
        assert obs.shape == (24,) and obs.dtype == np.float32
        assert env.step(env.action_space.sample())[0].shape == (24,)
        env = gymnasium.make("choreo/mw_reach", obs="pixels")
        assert env.reset(seed=0)[0].shape == (3, 64, 64)
        env.close()


def _doc_snippets(marker: str) -> list[str]:
    """The python blocks of docs/environments.md from `marker` up to the next heading."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "environments.md").read_text()
    start = readme.find(marker)
    assert start >= 0, f"docs/environments.md no longer has {marker!r}"
    end = readme.find("\n#", start + 1)
    return re.findall(r"```python\n(.*?)```", readme[start:end if end >= 0 else None], re.S)


def _readme_gymnasium_snippets() -> list[str]:
    """The python blocks of docs/environments.md's paragraph on gymnasium ids (up to the next heading)."""
    return _doc_snippets("registered with gymnasium")


def test_readme_gymnasium_snippets_work_in_a_fresh_interpreter():
    """The documentation's snippets, exactly as written, make a choreo env through gymnasium alone (a fresh
    interpreter: nothing of choreo imported beforehand)."""
    snippets = _readme_gymnasium_snippets()
    assert len(snippets) >= 1
    check = "\nprint(env.spec.id, env.observation_space.shape, obs.shape, obs.dtype)\nenv.close()\n"
    for snippet in snippets:
        out = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"docs/environments.md snippet failed:\n{snippet}\n{out.stderr[-3000:]}"
        assert out.stdout.split("\n")[-2] == "choreo/walker_flip (24,) (24,) float32", (snippet, out.stdout)


def test_readme_rendering_snippet_works_in_a_fresh_interpreter():
    (snippet,) = _doc_snippets("## Rendering")
    check = "\nprint(env.render_mode, frame.shape, frame.dtype, obs.shape)\nenv.close()\n"
    out = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"docs/environments.md snippet failed:\n{snippet}\n{out.stderr[-3000:]}"
    assert out.stdout.split("\n")[-2] == "rgb_array (64, 64, 3) uint8 (24,)", (snippet, out.stdout)


def test_mujoco_gl_set_on_import_unless_given():
    code = "import os, choreo.actors.envs; print(os.environ.get('MUJOCO_GL'))"
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "egl"
    env["MUJOCO_GL"] = "osmesa"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "osmesa"


# ------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("task", ["walker_stand", "mw_reach", "point_mass_nav", "ant_nav"])
def test_render_mode_rgb_array_through_gymnasium(task):
    """gymnasium's convention: `render_mode="rgb_array"` is taken, and render() returns the frame."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the env checker's render checks (declared modes, render_fps) pass
        env = gymnasium.make("choreo/" + task, render_mode="rgb_array")
        try:
            obs, _ = env.reset(seed=0)
            assert obs.shape == (env_spec(task).state_dim,)  # still states: rendering is a view of its own
            frame = env.render()
            env.step(env.action_space.sample())
            after = env.render()
        finally:
            env.close()
    assert env.render_mode == "rgb_array"
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and after.shape == frame.shape
    assert frame.std() > 0  # a picture, not a blank
    assert env.metadata["render_modes"] == ["rgb_array"] and env.metadata["render_fps"] > 0


def test_render_mode_values():
    env = make_env("point_mass_nav", render_mode=None)
    try:
        assert env.render_mode is None and env.render().shape == (64, 64, 3)  # drawn when asked, all the same
    finally:
        env.close()
    with pytest.raises(ValueError, match="render_mode must be 'rgb_array'"):
        make_env("point_mass_nav", render_mode="human")
    # render_fps is agent steps per simulated second: walker's control step of 0.025 s gives 40 at action
    # repeat 1, 20 at 2
    for action_repeat, fps in ((1, 40.0), (2, 20.0)):
        env = make_env("walker_stand", action_repeat=action_repeat)
        assert env.metadata["render_fps"] == pytest.approx(fps)
        env.close()


def test_check_env_with_rendering():
    from gymnasium.utils.env_checker import check_env

    env = gymnasium.make("choreo/point_mass_nav", render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)  # its render checks make the id again with every declared render mode
    env.close()
    # the only remarks: state observations are unbounded boxes, as every built-in id declares them
    remarks = [str(w.message) for w in caught]
    assert all("Box observation space" in r and "infinity" in r for r in remarks), remarks


def test_render_collection_and_record_video(tmp_path, monkeypatch):
    # "rgb_array_list": gymnasium.make wraps the env in RenderCollection, one frame per reset and step
    env = gymnasium.make("choreo/point_mass_nav", render_mode="rgb_array_list")
    env.reset(seed=0)
    for _ in range(10):
        env.step(np.ones(2, np.float32))  # full acceleration: a few pixels' way in 10 steps
    frames = env.render()
    env.close()
    assert len(frames) == 11 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[-1])  # the point moved

    # RecordVideo: with moviepy it writes an mp4; without it (not a dependency), a stand-in for
    # moviepy's clip receives what RecordVideo would encode: every frame, at the env's render_fps
    written: list[tuple[list[np.ndarray], float, str]] = []
    try:
        import moviepy  # noqa: F401
    except ImportError:
        import types

        class Clip:
            def __init__(self, frames: list[np.ndarray], fps: float) -> None:
                self.frames, self.fps = frames, fps

            def write_videofile(self, path: str, logger: object = None) -> None:
                written.append((self.frames, self.fps, path))
                Path(path).write_bytes(b"")

        clip_module = types.ModuleType("moviepy.video.io.ImageSequenceClip")
        clip_module.ImageSequenceClip = Clip
        for name in ("moviepy", "moviepy.video", "moviepy.video.io"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "moviepy.video.io.ImageSequenceClip", clip_module)
    inner = gymnasium.make("choreo/point_mass_nav", render_mode="rgb_array", max_episode_steps=5)
    env = gymnasium.wrappers.RecordVideo(inner, str(tmp_path / "videos"), disable_logger=True)
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    env.close()
    assert [p.suffix for p in (tmp_path / "videos").iterdir()] == [".mp4"]
    if written:
        ((frames, fps, _),) = written
        assert len(frames) == 6 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
        assert fps == pytest.approx(10.0)  # point_mass_nav: 0.1 s a step

# ------------------------------------------------------------------------------------ CLI


def test_list_envs(capsys):
    from choreo.launch.commands.envs import list_envs

    assert list_envs([]) == 0
    out = capsys.readouterr().out
    for task in ENV_IDS:
        assert task in out
    assert "(24,)" in out and "(78,)" in out and "(55,)" in out and "(39,)" in out and "(3, 64, 64)" in out
    assert list_envs(["no_such_env"]) != 0


def test_check_envs_names_failures(capsys):
    from choreo.launch.commands.envs import check_envs

    assert check_envs(["walker_walk", "gym:Pendulum-v1"]) == 0
    assert check_envs(["walker_walk", "gym:CartPole-v1", "no_such_env"]) != 0
    captured = capsys.readouterr()
    assert "ok     walker_walk" in captured.out
    assert "FAILED gym:CartPole-v1" in captured.out and "FAILED no_such_env" in captured.out
    assert "gym:CartPole-v1, no_such_env" in captured.err


def test_bench_envs_json(capsys):
    from choreo.launch import bench

    assert bench.main("envs", ["--steps", "60", "--domains", "walker,mw", "--obs", "states"], as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["envs"]) == {"walker", "mw"}
    assert data["envs"]["walker"]["states"]["steps_per_s"] > 0
    mw = data["envs"]["mw"]["states"]
    assert mw["action_repeat"] == 2 and mw["frames_per_s"] == pytest.approx(2 * mw["steps_per_s"], rel=0.01)
