"""`choreo envs`: list environment ids with their shapes, or check that they build and step."""

from __future__ import annotations

import sys
import time

import numpy as np

from choreo.actors.envs import ENV_IDS, env_spec, make_env

CHECK_STEPS = 5


def _ids(ids: list[str]) -> list[str]:
    return list(ids) if ids else list(ENV_IDS)


def list_envs(ids: list[str]) -> int:
    """Print each id (all built-in ids when `ids` is empty) with its observation shapes, action
    shape, episode length in agent steps at the default action repeats, and success reporting."""
    header = f"{'id':<26} {'domain':<10} {'states':<8} {'pixels':<12} {'action':<7} {'episode (agent steps)':<34} success"
    print(header)
    print("-" * len(header))
    bad = []
    for task in _ids(ids):
        try:
            spec = env_spec(task)
        except Exception as e:  # an unknown id, or a gym id that does not build
            print(f"{task:<26} error: {e}", file=sys.stderr)
            bad.append(task)
            continue
        ar_s, ar_p = spec.default_action_repeat("states"), spec.default_action_repeat("pixels")
        length = spec.episode_length(ar_s)
        if length is None:
            episode = "no limit"
        else:
            episode = f"{length} @AR{ar_s} states, {spec.episode_length(ar_p)} @AR{ar_p} pixels"
        pixels = "(3, 64, 64)" if spec.supports_pixels else "-"
        print(
            f"{task:<26} {spec.domain:<10} {str((spec.state_dim,)):<8} {pixels:<12} "
            f"{str((spec.action_dim,)):<7} {episode:<34} {'yes' if spec.has_success else 'no'}"
        )
    if not ids:
        print("\nplus gym:<id> for any installed gymnasium environment with a Box action space")
    return 2 if bad else 0


def _check_one(task: str, obs: str) -> str:
    """Build, reset and step `task`; return a short description or raise."""
    env = make_env(task, obs=obs, seed=0)
    try:
        first, _ = env.reset(seed=0)
        space = env.observation_space
        if first.shape != space.shape or first.dtype != space.dtype:
            raise AssertionError(f"reset observation {first.shape} {first.dtype} does not match {space}")
        rng = np.random.default_rng(0)
        total = 0.0
        for _ in range(CHECK_STEPS):
            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            ob, reward, terminated, truncated, _info = env.step(action)
            if ob.shape != space.shape or ob.dtype != space.dtype:
                raise AssertionError(f"step observation {ob.shape} {ob.dtype} does not match {space}")
            if not np.isfinite(reward):
                raise AssertionError(f"reward {reward} is not finite")
            if obs == "pixels" and ob.std() == 0:
                raise AssertionError("blank image")
            total += float(reward)
            if terminated or truncated:
                break
        return f"obs {first.shape} {first.dtype}, action {env.action_space.shape}, return {total:.3g} over {CHECK_STEPS} steps"
    finally:
        env.close()


def check_envs(ids: list[str], obs: str = "states") -> int:
    """Build, reset and step each id (all built-ins when `ids` is empty). Prints ok/FAILED per id;
    returns 1 and names every failed id when any failed."""
    failed: list[str] = []
    for task in _ids(ids):
        start = time.perf_counter()
        try:
            detail = _check_one(task, obs)
        except Exception as e:
            failed.append(task)
            print(f"FAILED {task} [{obs}]: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"ok     {task} [{obs}]: {detail} ({time.perf_counter() - start:.2f} s)", flush=True)
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(_ids(ids))} ok")
    return 0
