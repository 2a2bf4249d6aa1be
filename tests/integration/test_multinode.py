"""Multi-node pretraining: the cluster launcher config (`launch/cluster.yaml`) has the structure
`ray up` needs, and a tiny pretraining on a simulated two-node Ray cluster (two raylets on
loopback, started with `ray.cluster_utils.Cluster`) puts its environment workers on both nodes and
its learner on the node with the GPU, and finishes with a checkpoint; two learner ranks on the two
nodes train in step."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from choreo.launch.runtime.rundir import RunDir
from choreo.learner.learner import CHECKPOINT
from processes import listening_sockets  # tests/integration is on sys.path

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "launch" / "cluster.yaml"
TOTAL_FRAMES = 1200


# ---------------------------------------------------------------------- the launcher config


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_node_types(launcher):
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    # The head runs the driver only: no CPUs for Ray to schedule workers or the learner on.
    assert types[head]["resources"].get("CPU", 0) <= 1
    assert not types[head]["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != head}
    gpu_types = [name for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu_types = [name for name, t in workers.items() if not t["resources"].get("GPU")]
    assert gpu_types, "no node type offers a GPU for the learner"
    assert cpu_types, "no CPU node type for the environment workers"
    for name, t in workers.items():
        assert isinstance(t.get("min_workers"), int) and isinstance(t.get("max_workers"), int), name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: the learner and each worker need a CPU"
    assert sum(t["max_workers"] for t in workers.values()) <= launcher["max_workers"]


def test_cluster_yaml_commands(launcher):
    head_start = " ; ".join(launcher["head_start_ray_commands"])
    worker_start = " ; ".join(launcher["worker_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1", head_start), head_start
    assert "0.0.0.0" not in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    # Every node runs Ray with the same authentication mode, and gets the same token.
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, start
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert "RAY_task_events_max_num_task_in_gcs=10000" in head_start  # the GCS runs on the head


def test_cluster_yaml_installs_choreo_on_every_node(launcher):
    """Each node type's setup (the common commands, then the head's or the type's own) installs
    the synced repository with the pinned versions, with a CUDA torch on the GPU type only."""
    mounts = launcher["file_mounts"]
    repo = next(remote for remote, local in mounts.items() if local in (".", "./"))
    common = " ; ".join(launcher["setup_commands"])
    assert "MUJOCO_GL=egl" in common and "uv python install 3.11" in common
    head = launcher["head_node_type"]
    for name, node_type in launcher["available_node_types"].items():
        own = (launcher["head_setup_commands"] if name == head
               else node_type.get("worker_setup_commands", launcher["worker_setup_commands"]))
        install = [c for c in own if "make venv" in c or "pip install -e" in c]
        assert len(install) == 1, (name, own)
        assert f"cd {repo}" in install[0], install[0]
        cuda = "/whl/cu" in install[0]
        assert cuda == bool(node_type["resources"].get("GPU")), (name, install[0])
    # The start commands use the venv that the setup created in the synced repository.
    assert all(f"{repo}/.venv/bin/ray" in c for c in
               launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"])


def test_cluster_yaml_matches_rays_schema(launcher):
    """The same JSON schema `ray up` validates against (Ray 2.60's ray-schema.json)."""
    jsonschema = pytest.importorskip("jsonschema")
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # without importing Ray
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)


# ---------------------------------------------------------------------- a simulated two-node cluster


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """A tiny pretraining (4 workers, 2 shards) on a head with 4 CPUs and a second node with 5 CPUs
    and one GPU (a logical one on a machine without CUDA), both raylets on 127.0.0.1: all 4 workers
    would fit on either node, so only SPREAD puts them on both, and the learner (1 CPU, the GPU)
    always finds room on the second. Token authentication is on, as `connect_ray` reads it from the
    environment. Returns the exit code, the nodes' ids, the run directory, the driver's output and
    the nodes' listening sockets."""
    from choreo.launch.runtime.config import load_config
    from choreo.launch.runtime.distributed import run_distributed

    config = load_config(["tiny"], ["num_actors=4", "num_shards=2", f"learner.total_frames={TOTAL_FRAMES}",
                                    "learner.snapshot_frames=[]", "learner.checkpoint_minutes=10"])
    run_dir = tmp_path_factory.mktemp("multinode") / "run"
    RunDir(run_dir).write_config(config)
    with simulated_cluster(head_cpus=4) as cluster:
        gpu_node = cluster.add_node(num_cpus=5, num_gpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = run_distributed(config, run_dir, address=cluster.address)
        sockets = listening_sockets(include_self=False)  # both nodes' services, still running
    yield {"code": code, "nodes": nodes, "gpu_node": gpu_node.node_id, "run_dir": run_dir, "out": out.getvalue(),
           "sockets": sockets}


@contextlib.contextmanager
def simulated_cluster(head_cpus: int):
    """A `ray.cluster_utils.Cluster` whose head listens on 127.0.0.1 with `head_cpus` CPUs (add
    nodes with `cluster.add_node(..., node_ip_address="127.0.0.1")`), with the authentication mode
    of this process's Ray; shut down, with this process's connection, on exit."""
    with pytest.MonkeyPatch.context() as mp:
        # Ray reads both settings once, when it is imported: set them first. Loopback only: Ray
        # rewrites 127.0.0.1 to the outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))
        import ray
        from ray._private import ray_constants
        from ray._raylet import AuthenticationMode, get_authentication_mode
        from ray.cluster_utils import Cluster

        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # in case Ray was imported earlier
        # The nodes (child processes) must use the mode this process's Ray took at its import.
        token = get_authentication_mode() == AuthenticationMode.TOKEN
        mp.setenv("RAY_AUTH_MODE", "token" if token else "disabled")
        # Like `ray start`, a Cluster's nodes need the token to exist (only a local ray.init creates
        # one): `ray get-auth-token --generate` writes ~/.ray/auth_token unless there is one.
        subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], check=True,
                       capture_output=True, timeout=60)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        try:
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()


@pytest.mark.slow
def test_pretraining_on_two_nodes_finishes_with_workers_on_both(two_node_run):
    run_dir, nodes = two_node_run["run_dir"], two_node_run["nodes"]
    assert two_node_run["code"] == 0, two_node_run["out"][-3000:]
    assert "4 workers x 1 envs, 2 shards, learner on " in two_node_run["out"]
    assert len(nodes) == 2
    sockets = two_node_run["sockets"]
    assert sum("raylet" in name for name, _, _ in sockets) >= 2, sockets
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip, _ in sockets), sockets

    placement = json.loads((run_dir / "placement.json").read_text())
    assert sorted(placement["runners"]) == ["0", "1", "2", "3"] and sorted(placement["shards"]) == ["0", "1"]
    assert set(placement["runners"].values()) == nodes, placement  # SPREAD: workers on both nodes
    assert placement["learner"] == two_node_run["gpu_node"], placement  # the learner asked for the GPU
    assert set(placement["shards"].values()) <= nodes, placement

    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["counters"]["frames"] >= TOTAL_FRAMES
    assert checkpoint["updates"] > 0
    # Every shard wrote its replay: here both nodes share this machine's filesystem; on a real
    # cluster each shard writes on its own node (docs/clusters.md).
    assert sorted(p.name for p in (run_dir / "replay").glob("*.msgpack")) == ["shard0.msgpack", "shard1.msgpack"]
    assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.slow
def test_replay_shards_on_both_nodes(two_node_run):
    placement = json.loads((two_node_run["run_dir"] / "placement.json").read_text())
    assert set(placement["shards"].values()) == two_node_run["nodes"], placement


@pytest.mark.slow
def test_removed_node_has_its_workers_and_shards_restarted_on_the_others(tmp_path):
    """A node vanishes mid-run (its raylet and every process on it killed): its workers and shards
    (and the learner, if it was there) are started again on the head, and the run finishes."""
    from choreo.launch.runtime.config import load_config
    from choreo.launch.runtime.distributed import drive

    config = load_config(["tiny"], ["num_actors=2", "num_shards=2", "learner.total_frames=2400",
                                    "learner.snapshot_frames=[600]", "learner.checkpoint_minutes=1000"])
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_config(config)
    with simulated_cluster(head_cpus=4) as cluster:  # room for everything once the second node is gone
        second = cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        head = cluster.head_node.node_id
        removed: dict = {}

        def remove(driver) -> None:
            if not removed and driver.frames >= 900 and (run_dir / CHECKPOINT).exists():
                removed["placement"] = driver.placement()
                cluster.remove_node(second, allow_graceful=False)

        driver = drive(config, run_dir, address=cluster.address, on_tick=remove)
    assert driver.exit_code == 0
    before = removed["placement"]
    on_second = [i for i, node in before["runners"].items() if node == second.node_id]
    assert on_second, f"SPREAD put no worker on the second node: {before}"
    after = json.loads((run_dir / "placement.json").read_text())
    assert set(after["runners"].values()) == {head} and set(after["shards"].values()) == {head}, after
    assert after["learner"] == head
    for i in on_second:
        assert driver.runner_restarts[int(i)] >= 1
    shards_on_second = [i for i, node in before["shards"].items() if node == second.node_id]
    for i in shards_on_second:
        assert driver.shard_restarts[int(i)] == 1
    assert driver.learner_restarts == (1 if before["learner"] == second.node_id else 0)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]["frames"] >= 2400


@pytest.mark.slow
def test_learner_ranks_on_two_nodes_train_in_step(tmp_path, monkeypatch):
    """Two learner ranks on two nodes (the placement group spread, as PACK does when no node has
    room for both): they meet at rank 0's node over gloo, each takes all of its node's cores, and
    they train an offline dataset in step to the last update."""
    from choreo.launch.runtime.config import load_config
    from choreo.launch.runtime.distributed import drive

    groups = importlib.import_module("ray.util.placement_group")  # `ray.util.placement_group` is the function
    pack = groups.placement_group
    monkeypatch.setattr(groups, "placement_group",
                        lambda bundles, strategy="PACK", **kw: pack(bundles, strategy="STRICT_SPREAD", **kw))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(data / f"episode_{i}_40.npz", observation=rng.normal(size=(40, 24)).astype(np.float32),
                 action=rng.uniform(-1, 1, (40, 6)).astype(np.float32), reward=np.zeros((40, 1), np.float32),
                 discount=np.ones((40, 1), np.float32))
    config = load_config(["tiny"], [f"dataset.dir={data}", "learner.num_learners=2", "learner.device=cpu",
                                    "learner.threads=0", "learner.total_updates=20", "learner.snapshot_updates=[]"])
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_config(config)
    seen: dict = {}

    def look(driver) -> None:
        if "digests" not in seen and driver.updates >= 10:
            seen["digests"] = driver.learner.digests()

    with simulated_cluster(head_cpus=2) as cluster:
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        driver = drive(config, run_dir, address=cluster.address, on_tick=look)
    assert driver.exit_code == 0
    assert {rank["node_id"] for rank in driver.learner_ranks} == nodes
    assert [rank["threads"] for rank in driver.learner_ranks] == [os.cpu_count()] * 2  # alone on its node
    a, b = seen["digests"]
    assert a == b, "the ranks on the two nodes differ"
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["updates"] == 20 and checkpoint["learners"] == 2
