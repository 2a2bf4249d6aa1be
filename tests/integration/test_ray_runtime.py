"""The embedded Ray: a remote EnvRunner on walker_walk (tiny) returns chunks, takes weights and
stamps their version; every Ray process listens on loopback only and runs outside the driver's
process group."""

from __future__ import annotations

import os

import numpy as np
import pytest

from choreo import vocabulary as B
from processes import listening_sockets  # tests/integration is on sys.path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from choreo.launch.runtime.ray_runtime import shutdown_ray, start_local_ray

    info = start_local_ray(num_cpus=2)
    try:
        yield info
    finally:
        shutdown_ray()


def test_local_ray_is_on_loopback(local_ray):
    from choreo.launch.runtime.ray_runtime import LOOPBACK_ADDRESSES

    assert local_ray["node_ip"] == "127.0.0.1"
    assert local_ray["address"].startswith("127.0.0.1:")
    assert local_ray["dashboard_url"] is None
    assert local_ray["resources"]["CPU"] == 2
    sockets = listening_sockets()
    names = {name for name, _, _ in sockets}
    assert any("gcs" in n for n in names) and any("raylet" in n for n in names), sockets
    off_loopback = [s for s in sockets if s[1] not in LOOPBACK_ADDRESSES]
    assert not off_loopback, f"Ray listens beyond loopback: {off_loopback}"


def test_ray_processes_run_outside_this_process_group(local_ray):
    """A signal to the driver's process group (Ctrl-C, a scheduler's SIGTERM) must reach the driver
    only, so that it can write its final checkpoint before it stops Ray itself."""
    import psutil

    def rays(p: psutil.Process) -> bool:  # not another test's helper (multiprocessing's resource tracker)
        return "ray" in p.name() or any("ray" in part for part in p.cmdline()[:3])

    children = [p for p in psutil.Process().children(recursive=True) if rays(p)]
    assert any(p.name().startswith("raylet") for p in children)
    in_group = [(p.pid, p.name()) for p in children if os.getpgid(p.pid) == os.getpgrp()]
    assert not in_group, f"Ray processes in the driver's process group: {in_group}"


def test_gcs_keeps_a_bounded_task_record(local_ray):
    """The GCS of a run that lasts days must not keep a record of every call ever made."""
    import psutil

    from choreo.launch.runtime.ray_runtime import GCS_TASK_EVENTS

    gcs = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("gcs_server")]
    assert gcs, "no GCS process among this process's children"
    assert gcs[0].environ().get("RAY_task_events_max_num_task_in_gcs") == GCS_TASK_EVENTS


def test_remote_runner_chunks_and_weights(local_ray):
    import ray

    from choreo.launch.runtime.config import load_config
    from choreo.launch.runtime.ray_runtime import remote_runner_class

    config = load_config(["tiny"], ["env.task=walker_walk", "envs_per_actor=2", "num_actors=1",
                                    "learner.seed_frames=20", "replay.chunk_length=10"])
    actor = remote_runner_class(num_cpus=1).remote(config, 1, 0)
    try:
        info = ray.get(actor.info.remote(), timeout=60)
        assert info["stream_ids"] == [2, 3] and info["obs_shape"] == (24,) and info["action_dim"] == 6
        assert info["pid"] != os.getpid()

        chunks = ray.get(actor.run.remote(15), timeout=60)  # 16 rows per env: one chunk each
        assert sorted(s for s, _ in chunks) == [2, 3]
        for _, chunk in chunks:
            assert set(chunk) == set(B.KEYS)
            assert chunk[B.OBSERVATION].shape == (10, 24) and chunk[B.OBSERVATION].dtype == np.float32
            assert chunk[B.POLICY_VERSION].dtype == np.int64
            np.testing.assert_array_equal(chunk[B.POLICY_VERSION], -1)  # reset row + random seed steps

        # The acting weights as the learner would send them: a dict of numpy arrays.
        from choreo.agents.registry import make_policy

        policy = make_policy(config.algo, (24,), 6, config.agent, behaviour="explore", seed=5)
        weights = {k: v.numpy() for k, v in policy.state_dict().items()}
        assert ray.get(actor.set_weights.remote(ray.put(weights), 7), timeout=60) == 7
        assert ray.get(actor.version.remote(), timeout=60) == 7

        later = ray.get(actor.run.remote(30), timeout=60)
        rows = np.concatenate([c[B.POLICY_VERSION] for s, c in chunks + later if s == 2])
        steps = np.concatenate([~c[B.IS_FIRST] for s, c in chunks + later if s == 2])
        # 15 steps before the weights (10 random seed steps: 20 frames / 2 envs; then the policy
        # with its initial weights, version -1), then every step chosen by version 7
        assert len(rows) == 40  # 46 rows so far, in whole chunks of 10
        np.testing.assert_array_equal(rows[steps], np.r_[np.full(15, -1), np.full(steps.sum() - 15, 7)])

        stats = ray.get(actor.stats.remote(), timeout=60)
        assert stats["agent_steps"] == 90 and stats["version"] == 7 and stats["restarted"] is False
    finally:
        ray.kill(actor)
