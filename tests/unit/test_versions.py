"""The dependency set must be one that works at run time, not just one that resolves.

With no pins, pip resolves dm_control 1.0.50 + mujoco 4.0 (dm_control fails to load its models)
and metaworld 3.0.0 + mujoco 3.17 (Meta-World fails to construct). These tests fail if such a
combination is ever installed again, before anything more confusing breaks.
"""

from importlib.metadata import version



def _v(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version(name).split("+")[0].split(".")[:3])


def test_installed_versions_are_the_pinned_working_set():
    assert _v("mujoco") == (3, 3, 0)
    assert _v("dm_control") == (1, 0, 28)
    assert _v("metaworld") == (3, 1, 1)
    assert _v("numpy") < (2, 4, 0), "dm_control 1.0.28 calls numpy.in1d, removed in numpy 2.4"
    assert _v("gymnasium") == (1, 4, 0)
    assert _v("ray") == (2, 60, 0)
    assert (2, 13, 0) <= _v("torch") < (2, 14, 0)


def test_known_broken_combinations_are_absent():
    mujoco = _v("mujoco")
    assert mujoco < (4, 0, 0), "dm_control fails with mujoco 4 ('MjModel' has no attribute 'flex_vertedge')"
    if _v("metaworld") < (3, 1, 0):
        assert mujoco < (3, 17, 0), "metaworld 3.0.0 fails with mujoco >= 3.17 (mocap weld data size)"


def test_both_simulators_load_and_step():
    import numpy as np
    from dm_control import suite

    env = suite.load("quadruped", "walk")  # quadruped exercises the numpy<2.4 constraint
    env.reset()
    env.step(np.zeros(env.action_spec().shape))

    import gymnasium as gym
    import metaworld  # noqa: F401  (registers Meta-World/*)

    mw = gym.make("Meta-World/MT1", env_name="reach-v3", seed=0, disable_env_checker=True)
    obs, _ = mw.reset(seed=0)
    assert obs.shape == (39,)
    mw.step(np.zeros(4, np.float32))
    mw.close()


def test_pyproject_pins_match_the_tested_set():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in ("mujoco==3.3.0", "dm_control==1.0.28", "metaworld==3.1.1", "numpy==2.3.5", "ray[default]==2.60.0"):
        assert pin in deps, pin
    assert not any(d.startswith("torch==") for d in deps), "torch must stay a range so a CUDA build satisfies it"
