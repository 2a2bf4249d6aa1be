"""Ray for choreo: an embedded local Ray that listens on 127.0.0.1 only, joining an existing
cluster, and the environment worker as a restartable Ray actor.

Loopback with Ray 2.60 (see ../shared/reference/environment-probe.md, section 6): Ray rewrites
a node address of 127.0.0.1 to the machine's outward address unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which Ray reads when it is imported. `start_local_ray`
sets it (and patches the already-read constant when Ray was imported before), passes
`_node_ip_address="127.0.0.1"` and checks the result: every Ray service then listens on
127.0.0.1 (some as the IPv4-mapped ::ffff:127.0.0.1).

Authentication: Ray 2.60 enables token authentication by default and prints a notice about it.
The embedded Ray sets `RAY_AUTH_MODE=token` explicitly (unless the caller chose a mode): tokens
stay on, so other users of the machine cannot submit work to the loopback ports, and nothing is
printed or asked for; Ray creates `~/.ray/auth_token` on first use and its own processes read
it. `connect_ray` leaves the mode to the environment, since it must match the cluster's
(`RAY_AUTH_MODE=disabled` for a cluster started that way).

Memory of a run that lasts days: Ray's GCS keeps an event record of every task (each call to an
actor) up to `RAY_task_events_max_num_task_in_gcs`, whose default is far above what a run makes
in an hour. A pretraining makes about a hundred calls a second, and the GCS grew by about 150 MB
per 200k calls (measured here); the embedded Ray keeps the last GCS_TASK_EVENTS instead (flat at
about 90 MB), unless that variable is set. `launch/cluster.yaml` sets the same on the head node.

Signals to the run's process group: schedulers (`timeout`, SLURM's scancel, ...) send SIGTERM, and
a terminal's Ctrl-C sends SIGINT, to every process of the job's process group. Ray's processes
are the driver's children and would be in its group: they would get the signal as well and stop
while the driver still needs them for its final checkpoint. `start_local_ray` therefore starts
each process that Ray spawns itself (GCS, raylet, log monitor, dashboard) in a session, hence a
process group, of its own (`setsid`, by `start_new_session=True` on `ConsolePopen`, the one
`Popen` subclass through which Ray's `start_ray_process` starts them; only during `ray.init`).
The raylet's agents stay in the raylet's group and its workers get process groups of their own
in its session (Ray's per-worker process groups). A signal to the driver's group thus reaches
the driver only; the driver stops Ray with `shutdown_ray()` after its checkpoint: Ray's shutdown
kills the processes it started by PID, and the raylet stops its agents and workers. Nothing is
left when the driver dies without that shutdown (SIGKILL, a crash): Ray starts each of its
processes with PR_SET_PDEATHSIG=SIGKILL (kernel fate-sharing), which a new session does not
change, so GCS, raylet, log monitor and dashboard die with the driver, the workers within
seconds of their raylet, and the two agents once they notice the raylet gone (they exit about a
minute later, after failing to report it to the dead GCS; Ray's own behaviour, as before). Done only
where Ray uses that kernel fate-sharing (Linux): elsewhere Ray cleans up with a reaper that kills
the driver's process group, so its processes stay in that group (with SIGINT ignored, which keeps
Ctrl-C but not SIGTERM off them). The services still listen on loopback only: where a process
runs changes nothing of what it binds.

Ray's own messages: the raylet reports every worker death and task retry to the driver, which
prints them, and the workers' output is copied to the driver's terminal, about 18 terminal rows a
killed worker. A run says one line of its own per fault instead: given a `messages` file, the
driver's copy of Ray's messages and of the workers' output goes there (and Ray's session logs
stay where Ray writes them), unless `CHOREO_RAY_LOGS=1` brings them back to the terminal for
whoever debugs Ray.

Workers get `MUJOCO_GL=egl` and one OpenMP/MKL thread (torch then uses one intra-op thread per
worker: the acting networks are tiny and several workers share the cores), through the job's
runtime_env, and the driver's `MINARI_DATASETS_PATH` when it has one, so that the replay shards
find a `minari:` dataset where the driver checked it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from choreo.launch.runtime.build import make_eval_runner, make_runner
from choreo.buffer.codec import CodecError
from choreo.buffer.shard import CheckpointMismatchError, ReplayShard

LOOPBACK = "127.0.0.1"
LOOPBACK_ADDRESSES = ("127.0.0.1", "::ffff:127.0.0.1", "::1")

WORKER_ENV_VARS = {
    "MUJOCO_GL": "egl",
    "PYOPENGL_PLATFORM": "egl",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""Environment variables of every Ray worker process of a choreo job."""

DRIVER_ENV_VARS = ("MINARI_DATASETS_PATH",)
"""Environment variables that Ray workers take from the driver when it has them."""

RAY_MESSAGES_ENV = "CHOREO_RAY_LOGS"
"""Set to 1 to see Ray's own messages (worker deaths, task retries, the workers' output) on the
terminal, as Ray prints them, instead of in the run directory's file."""

GCS_TASK_EVENTS = "10000"
"""Task event records the embedded Ray's GCS keeps (only the state API and the dashboard read them)."""

RUNNER_MAX_TASK_RETRIES = 3
"""Retries of a runner call whose actor died while running it (the restarted actor runs it again).
Bounded, so that a worker that crashes every time surfaces as an error instead of a hang."""


def _runtime_env(extra: dict[str, str] | None = None) -> dict[str, Any]:
    env_vars = dict(WORKER_ENV_VARS)
    env_vars.update({name: os.environ[name] for name in DRIVER_ENV_VARS if name in os.environ})
    env_vars.update(extra or {})
    return {"env_vars": env_vars}


def _import_ray_for_loopback():
    """Import Ray with the loopback settings in place; patch them if Ray was imported earlier."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_task_events_max_num_task_in_gcs", GCS_TASK_EVENTS)  # read by the GCS it starts
    already = "ray" in sys.modules
    import ray
    from ray._private import ray_constants

    if already and ray_constants.ENABLE_RAY_CLUSTER:
        # Ray read the variable at import; the services module looks the constant up per call.
        ray_constants.ENABLE_RAY_CLUSTER = False
    if already:
        # Ray caches its config (the auth mode among it) at import: re-read it, as Ray itself
        # does when it turns token authentication on, or this process would not send the token.
        from ray._raylet import Config

        Config.initialize("")
    return ray


@contextlib.contextmanager
def _sigint_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal dispositions can only be changed from the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ray_processes_in_new_sessions():
    """While active, every process Ray starts itself (`ray._private.services.start_ray_process`:
    GCS, raylet, log monitor, dashboard) starts in a session, hence a process group, of its own.

    Only where Ray uses kernel fate-sharing (Linux, PR_SET_PDEATHSIG): without it Ray spawns a
    reaper that cleans up by killing the driver's process group, which needs them in that group.
    Yields whether the processes are moved."""
    from ray._private import services, utils

    original = getattr(services, "ConsolePopen", None)
    if not (sys.platform.startswith("linux") and utils.detect_fate_sharing_support()):
        yield False
        return
    if not (isinstance(original, type) and issubclass(original, subprocess.Popen)):
        warnings.warn("this Ray has no ray._private.services.ConsolePopen: its processes stay in this process's "
                      "group, and a SIGTERM sent to the group stops them before the final checkpoint",
                      RuntimeWarning, stacklevel=3)
        yield False
        return

    class _NewSessionPopen(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["start_new_session"] = True  # setsid() in the child, before Ray's preexec_fn
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _NewSessionPopen
    try:
        yield True
    finally:
        services.ConsolePopen = original


def start_local_ray(num_cpus: int | None = None, dashboard: bool = False, object_store_mb: int | None = None,
                    env_vars: dict[str, str] | None = None, num_gpus: int | None = None,
                    messages: Path | None = None) -> dict[str, Any]:
    """Start an embedded Ray owned by this process, listening on 127.0.0.1 only.

    num_cpus: CPUs Ray schedules (default: all cores). num_gpus: GPUs it schedules (default:
    those it finds). dashboard: start the dashboard on 127.0.0.1 (off by default: it costs about
    1 GiB of memory). object_store_mb: object store size (default: Ray's). env_vars: extra
    environment variables for the workers. messages: the file Ray's own messages go to instead of
    the terminal (see the module docstring; None: the terminal).
    Returns the address, node IP, dashboard URL (or None), session directory and resources.
    Stop it with `shutdown_ray()`.
    """
    ray = _import_ray_for_loopback()
    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process; call shutdown_ray() first")
    # Ray's processes are this one's children: a signal to this process's group (a terminal's
    # Ctrl-C, a scheduler's SIGTERM) must not reach them, or they die before the driver writes its
    # final checkpoint. They start in sessions of their own (see the module docstring) and with
    # SIGINT ignored (inherited; what keeps Ctrl-C off them where they stay in this group); the
    # driver stops them with `shutdown_ray()` after checkpointing.
    with _sigint_ignored(), _ray_processes_in_new_sessions():
        ctx = ray.init(
            address="local",  # always a new instance owned by this process, never someone else's cluster
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            object_store_memory=None if object_store_mb is None else int(object_store_mb) * 1024 * 1024,
            runtime_env=_runtime_env(env_vars),
            logging_level=logging.WARNING,
            log_to_driver=not _diverted(messages),
            _node_ip_address=LOOPBACK,
        )
    _divert_messages(messages)
    info = _context_info(ray, ctx)
    if info["node_ip"] != LOOPBACK:
        shutdown_ray()
        raise RuntimeError(f"Ray started on {info['node_ip']} instead of {LOOPBACK}; refusing to run off loopback")
    return info


def connect_ray(address: str = "auto", env_vars: dict[str, str] | None = None,
                messages: Path | None = None) -> dict[str, Any]:
    """Join a running Ray cluster (`auto` or `HOST:PORT`, e.g. one started with `ray start --head`).
    Authentication follows `RAY_AUTH_MODE` in the environment (it must match the cluster's).
    messages: as for `start_local_ray`."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process; call shutdown_ray() first")
    ctx = ray.init(address=address, runtime_env=_runtime_env(env_vars), logging_level=logging.WARNING,
                   log_to_driver=not _diverted(messages))
    _divert_messages(messages)
    return _context_info(ray, ctx)


def _diverted(messages: Path | None) -> bool:
    return messages is not None and os.environ.get(RAY_MESSAGES_ENV, "") in ("", "0")


_restore: list[Any] = []
"""What `_divert_messages` changed, undone by `shutdown_ray`."""


def _divert_messages(messages: Path | None) -> None:
    """Ray's messages to the driver go to the file `messages`: the raylet's reports (worker deaths,
    task retries) and Ray's log records (unhandled errors of lost calls). Ray prints the reports
    through `ray._private.worker.print_to_stdstream`, looked up at each call, and logs through the
    "ray" logger."""
    if not _diverted(messages):
        return
    from ray._private import worker as ray_worker

    Path(messages).parent.mkdir(parents=True, exist_ok=True)
    stream = open(messages, "a", buffering=1)  # noqa: SIM115 - open until shutdown_ray

    def to_file(data: dict, ignore_prefix: bool = False, **_: Any) -> None:
        for line in data.get("lines", ()):
            stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({data.get('pid', 'ray')}) {line}\n")

    printer = ray_worker.print_to_stdstream
    logger = logging.getLogger("ray")
    handlers = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                and getattr(h, "stream", None) in (sys.stdout, sys.stderr)]
    to_log = logging.StreamHandler(stream)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(to_log)
    ray_worker.print_to_stdstream = to_file

    def restore() -> None:
        ray_worker.print_to_stdstream = printer
        logger.removeHandler(to_log)
        for handler in handlers:
            logger.addHandler(handler)
        stream.close()

    _restore.append(restore)


def _context_info(ray: Any, ctx: Any) -> dict[str, Any]:
    address_info = ctx.address_info
    return {
        "address": address_info.get("address") or address_info.get("gcs_address"),
        "node_ip": address_info.get("node_ip_address"),
        "dashboard_url": ctx.dashboard_url or None,
        "session_dir": address_info.get("session_dir"),
        "resources": ray.cluster_resources(),
    }


def shutdown_ray() -> None:
    """Stop this process's Ray (the embedded instance and its processes, or the cluster connection)."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    while _restore:
        _restore.pop()()


# ---------------------------------------------------------------------- the remote environment worker


def _reconstructed() -> bool:
    """Whether this actor process is a restart by Ray (max_restarts) rather than the first start."""
    import ray

    with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated getter here
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _where() -> dict[str, Any]:
    """Node id (None outside Ray, e.g. in unit tests) and process id of this process."""
    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node_id, "pid": os.getpid()}


class RunnerActor:
    """Hosts an `EnvRunner` in a Ray actor: builds it with `make_runner` inside the worker (the
    environments are never pickled) and forwards its methods.

    After a restart (`max_restarts=-1`) the runner is rebuilt from the same seeds; it skips the
    random seed phase, which already happened, and carries a new `incarnation` (a random id per
    process), so the runtime sees the restart in the next `collect` result and sends the current
    weights again (until then the policy acts with its initial weights, stamped version -1). The
    streams keep their ids; the episode that was running when the worker died ends in the replay
    without an is_last row, and the new one starts with is_first.
    """

    def __init__(self, config: Any, runner_id: int, seed: int, behaviour: str | None = None,
                 num_runners: int | None = None, mode: str = "sample", evaluation: bool = False) -> None:
        """behaviour: the policy's (default: the run's); evaluation: the run's evaluation worker
        (`make_eval_runner`: its own seeds, the mean action), which only `evaluate`s."""
        self.runner = (make_eval_runner(config) if evaluation else
                       make_runner(config, runner_id, seed, behaviour=behaviour, num_runners=num_runners, mode=mode))
        self.incarnation = uuid.uuid4().hex[:12]
        self.restarted = _reconstructed()
        if self.restarted:
            self.runner.skip_random_steps()

    def step(self) -> list:
        return self.runner.step()

    def run(self, steps: int) -> list:
        return self.runner.run(steps)

    def collect(self, steps: int) -> tuple[list, dict[str, Any]]:
        """`run(steps)` plus a small summary; call with `.options(num_returns=2)` so the chunks
        can go to a shard by reference while the caller fetches only the summary."""
        chunks = self.runner.run(steps)
        return chunks, {"steps": steps * len(self.runner.envs), "incarnation": self.incarnation,
                        "version": self.runner.version, **_where()}

    def evaluate(self, episodes: int) -> dict[str, list]:
        return self.runner.evaluate(episodes)

    def set_weights(self, arrays: dict, version: int) -> int:
        self.runner.set_weights(arrays, version)
        return self.runner.version

    def version(self) -> int:
        return self.runner.version

    def stats(self) -> dict[str, Any]:
        stats = self.runner.stats()
        stats["restarted"] = self.restarted
        stats["incarnation"] = self.incarnation
        return stats

    def info(self) -> dict[str, Any]:
        """Static facts: shapes, stream ids, action repeat, incarnation, node and process id."""
        r = self.runner
        return {"runner_id": r.runner_id, "stream_ids": list(r.stream_ids), "obs_shape": r.obs_shape,
                "action_dim": r.action_dim, "action_repeat": r.action_repeat, "num_envs": len(r.envs),
                "incarnation": self.incarnation, **_where()}

    def skip_random_steps(self) -> None:
        self.runner.skip_random_steps()

    def close(self) -> None:
        self.runner.close()


def remote_runner_class(num_cpus: float = 1.0, max_task_retries: int = RUNNER_MAX_TASK_RETRIES) -> Any:
    """`RunnerActor` as a Ray actor class: restarted without limit when its process dies
    (`max_restarts=-1`), a call in flight retried up to `max_task_retries` times on the restarted
    actor (exceptions raised by the runner itself are not retried). Create one with
    `remote_runner_class().remote(config, runner_id, seed)`."""
    import ray

    return ray.remote(num_cpus=num_cpus, max_restarts=-1, max_task_retries=max_task_retries)(RunnerActor)


# ---------------------------------------------------------------------- the remote replay shard


class ShardActor(ReplayShard):
    """A `ReplayShard` in a Ray actor that Ray restarts when its process dies (`max_restarts=-1`):
    the restarted shard loads its last checkpoint from `replay_dir` (it starts empty if there is
    none yet, or if the file cannot be read: `info()["restore_error"]` says why).

    `add_chunks` answers the steps added together with the shard's `incarnation` (a random id per
    process), so the runtime can tell which acknowledged steps died with an earlier process: those
    beyond the checkpoint's `steps_inserted` counter (`info()["restored_inserted"]`) are lost.
    """

    def __init__(self, capacity: int, seed: int, name: str, replay_dir: str,
                 dataset: tuple[Any, int, tuple[int, ...], int] | None = None) -> None:
        """dataset: (run config, shard index, observation shape, action size) when the run loads an
        offline dataset: `load_dataset` loads this shard's part, and a restarted shard without a
        replay checkpoint (an offline-only run saves none) loads it again."""
        super().__init__(capacity, seed, name)
        self.replay_dir = replay_dir
        self.dataset = dataset
        self.incarnation = uuid.uuid4().hex[:12]
        self.restored_inserted = 0
        self.restore_error: str | None = None
        if _reconstructed():
            try:
                self.load(replay_dir)
                self.restored_inserted = int(self.stats()["steps_inserted"])
            except FileNotFoundError:
                if dataset is not None:  # its dataset part is what it held before its first checkpoint
                    self.load_dataset()
                    self.restored_inserted = int(self.stats()["steps_inserted"])
                # otherwise it died before its first checkpoint: everything it held is lost
            except (CodecError, CheckpointMismatchError) as exc:
                self.restore_error = str(exc)

    def load_dataset(self) -> dict[str, Any]:
        """Loads this shard's part of the run's dataset; returns the load's summary as a dict."""
        from choreo.launch.runtime.build import load_dataset_part

        config, index, obs_shape, action_dim = self.dataset
        return load_dataset_part(config, self, index, obs_shape, action_dim).to_dict()

    def add_chunks(self, chunks: list) -> tuple[int, str]:
        return self.add_many(chunks), self.incarnation

    def resume(self) -> int:
        """Load the checkpoint of a resumed run (a missing or bad file is an error here)."""
        self.load(self.replay_dir)
        self.restored_inserted = int(self.stats()["steps_inserted"])
        return self.restored_inserted

    def save_checkpoint(self) -> str:
        return str(self.save(self.replay_dir))

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "incarnation": self.incarnation}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "incarnation": self.incarnation, "restored_inserted": self.restored_inserted,
                "restore_error": self.restore_error, "steps_inserted": int(super().stats()["steps_inserted"]),
                **_where()}
