"""Two Ray nodes on addresses of their own, as on a real cluster: two network namespaces joined by a
veth pair (10.231.0.1 and 10.231.0.2), a head started with `ray start --head` in one and a worker
node joining it from the other, token authentication on with a token made for the test (the recipe
of docs/clusters.md). A tiny `choreo pretrain --address` from the head's namespace puts workers on
both nodes and finishes with a checkpoint; raylets without the token or with a wrong one cannot
join while it runs; a second run survives every process of the worker's namespace killed
mid-run (workers and shards come back on the head) and finishes.

Needs root and iproute2 (`ip netns`); skipped otherwise. Every process the test starts lives in
one of its two namespaces, so `ip netns pids` finds them all for the teardown, and no traffic
leaves them. Nothing uses the machine's Ray temp dir or ~/.ray: the nodes share a temp dir of the
test's own and the token lives in a temporary HOME."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from choreo.learner.learner import CHECKPOINT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the venv's bin: ray and choreo come with it
HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"
GCS_PORT = 6379  # inside the head's namespace: no other Ray on the machine can be there
ADDRESS = f"{HEAD_IP}:{GCS_PORT}"
HEAD_CPUS = 6  # room for the learner, the 4 workers and the shards' shares once the other node is gone
WORKER_CPUS = 3
NUM_ACTORS, NUM_SHARDS = 4, 2
BAD_JOIN_TIMEOUT_S = 90.0  # how long a raylet that must not join gets to give up (about 20 s here)
RUN_TIMEOUT_S = 240.0

# The node list as the GCS has it (every node that ever registered, alive or dead), read with the
# GCS client that `ray status` uses: lighter than a second driver, which would make the raylet
# start workers.
NODES_SCRIPT = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=30).values()
print(json.dumps([{"node_id": i.node_id.hex(), "ip": i.node_manager_address,
                   "alive": i.state == GcsNodeInfo.GcsNodeState.ALIVE} for i in infos]))
"""


class NetnsPair:
    """Network namespaces `a` and `b` joined by a veth pair, with HEAD_IP and WORKER_IP; their
    names carry this process's id, so that runs side by side do not clash. Processes started with
    `exec` are tracked; `close` kills every process in either namespace and deletes them."""

    def __init__(self, tag: str) -> None:
        self.a, self.b = f"choreo-a-{tag}", f"choreo-b-{tag}"
        self.veth_a, self.veth_b = f"chva{tag}"[:15], f"chvb{tag}"[:15]  # interface names: 15 characters at most
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def create(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
        for ns, dev, address in ((self.a, self.veth_a, HEAD_IP), (self.b, self.veth_b, WORKER_IP)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # Ray's processes also talk over loopback
        _ip("netns", "exec", self.a, "true")  # entering one needs more than making it (mount privileges)

    def exec(self, ns: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """argv in namespace ns, in a process group of its own, output to log."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self, ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, ns: str, timeout_s: float = 20.0) -> None:
        """SIGKILL to every process in ns until none is left (Ray's raylet may still be starting
        workers while the first ones die)."""
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids(ns)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def close(self) -> None:
        for ns in self.made:
            self.kill_all(ns)
        for proc in self.procs:  # the process groups too, should any of them have left the namespace
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made, self.procs = [], []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[NetnsPair]:
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux's")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make network namespaces")
    pair = NetnsPair(str(os.getpid()))
    try:
        pair.create()
    except subprocess.CalledProcessError as exc:
        pair.close()
        pytest.skip(f"cannot make network namespaces: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
    try:
        yield pair
    finally:
        pair.close()


def ray_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without Ray's settings (an embedded Ray of an earlier test sets loopback-only
    ones), HOME at `home` (Ray reads the token from $HOME/.ray/auth_token), and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", MUJOCO_GL="egl")
    env.update(extra)
    return env


def nodes(netns: NetnsPair, env: dict[str, str]) -> list[dict]:
    out = subprocess.run(["ip", "netns", "exec", netns.a, str(BIN / "python"), "-c", NODES_SCRIPT, ADDRESS],
                         env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> Any:
    """check() until it returns something true; fails if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else ""


def _placement(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "placement.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return None


def _finish(proc: subprocess.Popen, log: Path, timeout_s: float = RUN_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {timeout_s:.0f} s:\n{_tail(log)}")
    return log.read_text(errors="replace")


def test_two_nodes_on_their_own_addresses(netns: NetnsPair, tmp_path: Path) -> None:
    """One cluster, two runs: the first with intruding raylets, the second losing the worker node."""
    started = time.monotonic()
    # Ray's socket paths must stay under 108 characters: a short temp dir, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="choreo-ns-"))
    try:
        _run(netns, tmp_path, temp_dir)
    finally:
        netns.close()  # before the temp dir goes: Ray's processes write there until they die
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"two-namespace cluster test: {time.monotonic() - started:.0f} s")


def _run(netns: NetnsPair, tmp_path: Path, temp_dir: Path) -> None:
    ray, choreo = str(BIN / "ray"), str(BIN / "choreo")
    logs = tmp_path / "logs"
    logs.mkdir()
    # The token: made on the head (`ray get-auth-token --generate` writes $HOME/.ray/auth_token) and
    # copied to the worker node, as docs/clusters.md says; in temporary homes, never the user's.
    head_home, worker_home, empty_home = tmp_path / "home-head", tmp_path / "home-worker", tmp_path / "home-empty"
    for home in (head_home, worker_home, empty_home):
        home.mkdir()
    subprocess.run([ray, "get-auth-token", "--generate"], env=ray_env(head_home), check=True, capture_output=True,
                   timeout=60)
    (worker_home / ".ray").mkdir()
    shutil.copy(head_home / ".ray" / "auth_token", worker_home / ".ray" / "auth_token")
    head_env = ray_env(head_home, RAY_AUTH_MODE="token")
    node_args = [f"--temp-dir={temp_dir}", "--disable-usage-stats"]

    # A node's death is noticed after health_check_failure_threshold missed checks, one per
    # health_check_period_ms (5 x 3 s by default): 1 s apart keeps the second run short.
    gcs_env = dict(head_env, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5")
    head = netns.exec(netns.a, [ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={GCS_PORT}",
                                f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false", *node_args],
                      gcs_env, logs / "head.log")
    assert head.wait(timeout=120) == 0, _tail(logs / "head.log")
    worker = netns.exec(netns.b, [ray, "start", f"--address={ADDRESS}", f"--node-ip-address={WORKER_IP}",
                                  f"--num-cpus={WORKER_CPUS}", *node_args],
                        ray_env(worker_home, RAY_AUTH_MODE="token"), logs / "worker.log")
    assert worker.wait(timeout=120) == 0, _tail(logs / "worker.log")
    cluster = wait_for("two live nodes", lambda: (n := nodes(netns, head_env)) and
                       sum(x["alive"] for x in n) == 2 and n, 60)
    by_ip = {n["ip"]: n["node_id"] for n in cluster}
    assert set(by_ip) == {HEAD_IP, WORKER_IP}, cluster  # each node on its own address
    head_id, worker_id = by_ip[HEAD_IP], by_ip[WORKER_IP]

    def pretrain(run_name: str, overrides: list[str]) -> tuple[subprocess.Popen, Path, Path]:
        log = logs / f"{run_name}.log"
        proc = netns.exec(netns.a, [choreo, "pretrain", "--preset", "tiny", "--address", ADDRESS,
                                    "--logdir", str(tmp_path / "runs"), f"run_name={run_name}",
                                    f"num_actors={NUM_ACTORS}", f"num_shards={NUM_SHARDS}", *overrides],
                          head_env, log, cwd=tmp_path)
        return proc, tmp_path / "runs" / run_name, log

    # ---- run 1: workers on both nodes; raylets without the token or with a wrong one cannot join
    proc, run_dir, log = pretrain("both", ["learner.total_frames=4000", "learner.snapshot_frames=[]",
                                           "learner.checkpoint_minutes=1000"])
    before = wait_for("placement.json", lambda: _placement(run_dir), RUN_TIMEOUT_S, proc, log)
    intruders = {
        "without a token": netns.exec(netns.b, [ray, "start", f"--address={ADDRESS}", f"--node-ip-address={WORKER_IP}",
                                                "--num-cpus=1", *node_args],
                                      ray_env(empty_home, RAY_AUTH_MODE="disabled"), logs / "without a token.log"),
        "with a wrong token": netns.exec(netns.b, [ray, "start", f"--address={ADDRESS}",
                                                   f"--node-ip-address={WORKER_IP}", "--num-cpus=1", *node_args],
                                         ray_env(empty_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex),
                                         logs / "with a wrong token.log"),
    }
    # Ray refuses them at their first call to the GCS; `ray start` then retries for about 20 s
    # and fails. What matters: they tried while the run was running, and never became nodes.
    assert proc.poll() is None, "the run ended before the raylets tried to join: make it longer"
    deadline = time.monotonic() + BAD_JOIN_TIMEOUT_S
    outcome: dict[str, int | None] = {}
    for name, bad in intruders.items():
        try:
            outcome[name] = bad.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            outcome[name] = None  # still trying: what counts is that it never joined
    for bad in intruders.values():  # whatever a refused `ray start` left behind
        try:
            os.killpg(bad.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"raylets that must not join, exit codes: {outcome} (None: still trying after {BAD_JOIN_TIMEOUT_S:.0f} s)")
    for name, code in outcome.items():
        assert code != 0, f"the raylet {name} started: {_tail(logs / f'{name}.log')}"
        if code is not None:  # refused for its token, not for something else
            assert "InvalidAuthToken" in _tail(logs / f"{name}.log", 20000), _tail(logs / f"{name}.log")
    seen = nodes(netns, head_env)  # every node that ever registered, dead ones too
    assert {n["node_id"] for n in seen} == {head_id, worker_id}, (seen, outcome)

    out = _finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    finished = [line for line in out.splitlines() if line.startswith("finished:")]
    assert finished and "restarts" not in finished[-1], out[-4000:]  # undisturbed
    assert not re.search(r"(worker|shard) \d+\b.*restart", out), out[-4000:]
    after = _placement(run_dir)
    assert after == before, (before, after)
    assert set(after["runners"].values()) == {head_id, worker_id}, after  # SPREAD: workers on both nodes
    assert set(after["shards"].values()) == {head_id, worker_id}, after  # round-robin over the nodes
    assert after["learner"] in (head_id, worker_id)
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["counters"]["frames"] >= 4000 and checkpoint["updates"] > 0

    # ---- run 2: every process of the worker's namespace is killed mid-run
    proc, run_dir, log = pretrain("node-lost", ["learner.total_frames=4000", "learner.snapshot_frames=[600]",
                                                "learner.checkpoint_minutes=1000"])
    # after the first checkpoint (written with the 600-frame snapshot), so a learner lost with the
    # node resumes from it
    wait_for("the first checkpoint", lambda: (run_dir / CHECKPOINT).exists(), RUN_TIMEOUT_S, proc, log)
    before = _placement(run_dir)
    on_worker = [i for i, node in before["runners"].items() if node == worker_id]
    assert on_worker, f"SPREAD put no environment worker on the worker node: {before}"
    shards_on_worker = [i for i, node in before["shards"].items() if node == worker_id]
    assert netns.pids(netns.b), "nothing runs in the worker's namespace"
    killed_at = time.monotonic()
    netns.kill_all(netns.b)  # the worker node is gone at once: raylet, agents, workers and shards
    assert proc.poll() is None, "the run ended before the worker node was killed: make it longer"
    out = _finish(proc, log)
    print(f"run 2 ended {time.monotonic() - killed_at:.0f} s after the worker node was killed")
    assert proc.returncode == 0, out[-4000:]
    finished = [line for line in out.splitlines() if line.startswith("finished:")]
    assert finished, out[-4000:]
    restarts = re.search(r"(\d+) worker restarts", finished[-1])
    assert restarts and int(restarts.group(1)) >= len(on_worker), finished[-1]
    for i in on_worker:  # a line for each restart, as it happened (its wording is the monitor's)
        assert re.search(rf"worker {i}\b.*restart", out), out[-4000:]
    if shards_on_worker:
        shard_restarts = re.search(r"(\d+) shard restarts", finished[-1])
        assert shard_restarts and int(shard_restarts.group(1)) >= len(shards_on_worker), finished[-1]
        for i in shards_on_worker:
            assert re.search(rf"shard {i}\b.*restarted from its checkpoint", out), out[-4000:]
    if before["learner"] == worker_id:
        assert re.search(r"\d+ learner restarts", finished[-1]), finished[-1]
    after = _placement(run_dir)  # rewritten: everything on the head now
    assert set(after["runners"].values()) == {head_id}, after
    assert set(after["shards"].values()) == {head_id}, after
    assert after["learner"] == head_id, after
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["counters"]["frames"] >= 4000
    alive = {n["node_id"] for n in nodes(netns, head_env) if n["alive"]}
    assert alive == {head_id}, alive
