"""`choreo bench soak`: a long pretraining on an embedded Ray while processes are SIGKILLed.

Runs `choreo pretrain` (launch.runtime.distributed.drive) with the tiny model (default: 4 workers, 2 replay
shards, a checkpoint every minute so that a restarted shard has one to load, total_frames so large
that the run never finishes by itself) in a temporary run directory (kept under --logdir), for
--minutes. Counted from the driver's first loop turn (after Ray's start and the actors'
construction), it SIGKILLs a random environment worker's process every --kill-actor-every seconds
and a random replay shard's process every --kill-shard-every seconds (0: never; none in the last
20 s), one line per kill.
A process is killed only once the driver has seen the previous kill of that worker or shard (its
process id changed); the delay until the driver sees each restart is reported. After --minutes the
run is stopped like Ctrl-C (final checkpoint, exit code 130).

Reported at the end: frames, updates, frames/s and updates/s (from the first loop turn), restarts
of workers, shards and learner against the kills, steps lost, the samples-per-insert ratio against
its target, and the resident memory (RSS) of the driver, the learner, each worker and shard, Ray's
raylet and GCS server, sampled every 10 s: at the process's start (a restarted process: its
restart), once it settled (60 s later, after the first updates and the replay's first pages), at
the end, and the peak. A warning line names every process whose RSS grew from settled to end by
more than 20% + 50 MB. RSS counts the object store's shared pages a process touched, so the same
memory may appear in several processes.

Also reported: the terminal rows the run printed per kill, as an 80-column terminal would show
them (everything written to this process's stdout and stderr, Ray's and its C++ logs included,
between the first loop turn and the stop, less the soak's own lines and the progress line, which a
terminal redraws in place; a line redrawn with `\r` is one row, a longer one wraps). A fault should cost a line or two, not Ray's tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import sys
import threading
import time
from typing import Any

from choreo.launch.bench.pretrain import _positive, drive_in_new_run

PROG = "choreo bench soak"
DEFAULT_PRESETS = ["tiny"]
DEFAULT_OVERRIDES = ["num_actors=4", "num_shards=2", "learner.checkpoint_minutes=1",
                     "learner.total_frames=1000000000000"]
SAMPLE_SECONDS = 10.0
SETTLE_SECONDS = 60.0
QUIET_SECONDS = 20.0
"""No kills in the last seconds of the run, so that the driver can see every restart."""
GROWTH_SHARE, GROWTH_MB = 0.20, 50.0
MB = 1024 * 1024
ROLE_NAMES = {"worker": "environment worker", "shard": "replay shard"}
COLUMNS = 80
"""The terminal width the rows are counted for."""
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"^\s*[\d,]+/[\d,]+ (frames|updates)\b")
"""The progress line: redrawn in place on a terminal, a plain line every 30 s into the pipe the
counter reads, so not counted."""


def terminal_rows(line: str, columns: int = COLUMNS) -> int:
    """Rows a line (without its newline) takes on a terminal `columns` wide: the longest of its
    `\r`-separated redraws, wrapped; an empty line is one row."""
    widths = [len(_ESCAPES.sub("", part)) for part in line.split("\r")]
    return max(1, max(-(-w // columns) for w in widths))


class RowCounter:
    """Counts the terminal rows written to file descriptors 1 and 2 while it is on (`counting`), and
    passes everything through to where they pointed before: the descriptors are pipes meanwhile, so
    what Ray's processes and C++ code write there is counted as well as what Python prints."""

    def __init__(self, columns: int = COLUMNS) -> None:
        self.columns = columns
        self.rows = 0
        self.counting = False
        self._threads: list[threading.Thread] = []
        self._saved: list[tuple[int, int]] = []

    def __enter__(self) -> RowCounter:
        for fd in (1, 2):
            (sys.stdout if fd == 1 else sys.stderr).flush()
            original = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            self._saved.append((fd, original))
            thread = threading.Thread(target=self._pump, args=(read, original), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _pump(self, read: int, out: int) -> None:
        pending = ""
        while chunk := os.read(read, 65536):
            os.write(out, chunk)
            pending += chunk.decode(errors="replace")
            *lines, pending = pending.split("\n")
            if self.counting:
                self.rows += sum(terminal_rows(line, self.columns) for line in lines
                                 if not _PROGRESS.match(_ESCAPES.sub("", line.split("\r")[-1])))
        os.close(read)

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in self._saved:
            os.dup2(original, fd)  # closes the pipe's last write end: its pump ends
        for thread in self._threads:
            thread.join(timeout=5)
        for _, original in self._saved:
            os.close(original)


def _seconds_or_zero(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes seconds, got {text!r}") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a number of seconds >= 0 (0: never), got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=_positive(float, "--minutes"), default=10.0,
                   help="length of the run, from the driver's first loop turn (default 10)")
    p.add_argument("--kill-actor-every", type=_seconds_or_zero("--kill-actor-every"), default=120.0, metavar="S",
                   help="SIGKILL a random environment worker every S seconds (default 120; 0: never)")
    p.add_argument("--kill-shard-every", type=_seconds_or_zero("--kill-shard-every"), default=300.0, metavar="S",
                   help="SIGKILL a random replay shard every S seconds (default 300; 0: never)")
    p.add_argument("--preset", action="append", default=None, metavar="NAME",
                   help="preset from configs/{algo,suite,size}/ (repeatable; default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of victims (default 0)")
    p.add_argument("--logdir", default=None, help="keep the run directory here (default: a temporary one, deleted)")
    p.add_argument("--json", action="store_true", help="print a JSON object at the end")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides after the soak's own ({' '.join(DEFAULT_OVERRIDES)})")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """The options and the resolved config (ConfigError for a bad preset or key=value)."""
    from choreo.launch.runtime.config import load_config

    args = _parser().parse_args(argv)
    args.preset = args.preset or list(DEFAULT_PRESETS)
    config = load_config(args.preset, [*DEFAULT_OVERRIDES, *args.overrides])
    return args, config


# ---------------------------------------------------------------------------- memory


@dataclasses.dataclass
class Proc:
    """One incarnation of a process of the run: its RSS at start, once settled, last and peak."""

    role: str
    index: int | None
    pid: int
    since: float
    incarnation: int = 0  # how many processes held this role and index before
    start: float | None = None
    settled: float | None = None
    end: float | None = None
    peak: float = 0.0

    def sample(self, now: float, psutil: Any) -> None:
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return  # killed, not reaped yet
            rss = process.memory_info().rss / MB
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return  # killed and not restarted yet (or gone)
        if rss <= 0:
            return
        if self.start is None:
            self.start = rss
        if self.settled is None and now - self.since >= SETTLE_SECONDS:
            self.settled = rss
        self.end = rss
        self.peak = max(self.peak, rss)

    def grew(self) -> bool:
        """Grown from settled to end by more than GROWTH_SHARE + GROWTH_MB."""
        if self.settled is None or self.end is None:
            return False
        return self.end > self.settled * (1 + GROWTH_SHARE) + GROWTH_MB


class Soak:
    """on_tick hook: samples memory, kills processes on schedule, stops the run after `minutes`."""

    def __init__(self, minutes: float, kill_actor_every: float, kill_shard_every: float, seed: int = 0,
                 out=print) -> None:
        self.seconds = 60.0 * minutes
        self.every = {"worker": kill_actor_every, "shard": kill_shard_every}
        self.rng = random.Random(seed)
        self.out = out
        self.t0: float | None = None
        self.first: tuple[int, int] = (0, 0)  # frames and updates at the first turn
        self.last: tuple[float, int, int] = (0.0, 0, 0)
        self.next_kill: dict[str, float] = {}
        self.kills: dict[str, int] = {"worker": 0, "shard": 0}
        self.pending: dict[tuple[str, int], tuple[int, float]] = {}  # killed, not seen restarted: (pid, when)
        self.detect_delays: dict[str, list[float]] = {"worker": [], "shard": []}
        self.skipped: dict[str, int] = {"worker": 0, "shard": 0}
        self.procs: dict[tuple[str, int | None], Proc] = {}
        self.last_sample = 0.0
        self.stopped = False
        self.ray_start_mb: tuple[float, int] | None = None
        self.ray_end_mb: tuple[float, int] | None = None
        self.rows = RowCounter()
        self.own_rows = 0  # the soak's own lines, not counted against the run

    # ------------------------------------------------------------------ processes

    def _current(self, driver: Any) -> dict[tuple[str, int | None], int]:
        pids = driver.pids()
        current: dict[tuple[str, int | None], int] = {("driver", None): os.getpid(), ("learner", None): pids["learner"]}
        current.update({("worker", i): pid for i, pid in enumerate(pids["runners"])})
        current.update({("shard", i): pid for i, pid in enumerate(pids["shards"])})
        for name, pid in self._ray_services().items():
            current[(name, None)] = pid
        return current

    def _ray_services(self) -> dict[str, int]:
        """The raylet and GCS server among this process's descendants (an embedded Ray's)."""
        import psutil

        found = {}
        for child in psutil.Process().children(recursive=True):
            try:
                name = child.name()
            except psutil.Error:
                continue
            if name.startswith("raylet"):
                found["raylet"] = child.pid
            elif name.startswith("gcs_server"):
                found["gcs"] = child.pid
        return found

    def _ray_total(self) -> tuple[float, int]:
        """RSS summed over this process's descendants (every Ray process of an embedded Ray)."""
        import psutil

        total, count = 0.0, 0
        for child in psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss / MB
                count += 1
            except psutil.Error:
                pass
        return total, count

    def sample(self, driver: Any, now: float) -> None:
        import psutil  # installed with Ray

        for key, pid in self._current(driver).items():
            proc = self.procs.get(key)
            if proc is None or proc.pid != pid:
                count = 0 if proc is None else proc.incarnation + 1
                proc = self.procs[key] = Proc(key[0], key[1], pid, now, count)
            proc.sample(now, psutil)
        self.last_sample = now

    # ------------------------------------------------------------------ kills

    def _check_pending(self, driver: Any, now: float) -> None:
        """Kills whose restart the driver has seen by now (the process id it holds changed)."""
        if not self.pending:
            return
        pids = driver.pids()
        for (role, i), (pid, when) in list(self.pending.items()):
            if pids["runners" if role == "worker" else "shards"][i] != pid:
                del self.pending[(role, i)]
                self.detect_delays[role].append(now - when)

    def _kill(self, driver: Any, role: str, now: float) -> None:
        pids = driver.pids()["runners" if role == "worker" else "shards"]
        # A worker or shard killed before is a victim again only once the driver saw its restart.
        candidates = [i for i in range(len(pids)) if (role, i) not in self.pending]
        elapsed = now - self.t0
        if not candidates:
            self.skipped[role] += 1
            self._say(f"[{_clock(elapsed)}] no {ROLE_NAMES[role]} to kill: the driver has not seen the last "
                     f"kills' restarts yet", flush=True)
            return
        i = self.rng.choice(candidates)
        try:
            os.kill(pids[i], signal.SIGKILL)
        except ProcessLookupError:
            self._say(f"[{_clock(elapsed)}] {ROLE_NAMES[role]} {i} (pid {pids[i]}) was already gone", flush=True)
            return
        self.kills[role] += 1
        self.pending[(role, i)] = (pids[i], now)
        self._say(f"[{_clock(elapsed)}] SIGKILL {ROLE_NAMES[role]} {i} (pid {pids[i]}); {driver.frames:,} frames, "
                 f"{driver.updates:,} updates; restarts seen so far: workers {sum(driver.runner_restarts)}, "
                 f"shards {sum(driver.shard_restarts)}, learner {driver.learner_restarts}", flush=True)

    def _say(self, text: str, **kwargs: Any) -> None:
        """One of the soak's own lines: shown, and not counted against the run's rows."""
        self.own_rows += terminal_rows(text)
        self.out(text, **kwargs)

    # ------------------------------------------------------------------ the hook

    def __call__(self, driver: Any) -> None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
            self.rows.counting = True
            self.first = (driver.frames, driver.updates)
            self.next_kill = {role: now + every for role, every in self.every.items() if every > 0}
            self.ray_start_mb = self._ray_total()
            self.sample(driver, now)
        self.last = (now, driver.frames, driver.updates)
        self._check_pending(driver, now)
        if now - self.last_sample >= SAMPLE_SECONDS:
            self.sample(driver, now)
        for role, due in list(self.next_kill.items()):
            if now >= due:
                if due - self.t0 <= self.seconds - QUIET_SECONDS:  # no kill at the very end
                    self._kill(driver, role, now)
                self.next_kill[role] = due + self.every[role]
        if now - self.t0 >= self.seconds and not self.stopped:
            self.sample(driver, now)
            self.ray_end_mb = self._ray_total()
            self.rows.counting = False
            self.stopped = True
            raise KeyboardInterrupt  # the driver ends as on Ctrl-C: final checkpoint, exit 130

    # ------------------------------------------------------------------ the report

    def figures(self, driver: Any) -> dict[str, Any]:
        s = driver.summary()
        wall = self.last[0] - self.t0 if self.t0 is not None else 0.0
        frames, updates = self.last[1] - self.first[0], self.last[2] - self.first[1]
        order = {"driver": 0, "learner": 1, "worker": 2, "shard": 3, "raylet": 4, "gcs": 5}
        procs = sorted(self.procs.values(), key=lambda p: (order.get(p.role, 9), p.index or 0))
        kills = sum(self.kills.values())
        rows = max(self.rows.rows - self.own_rows, 0)
        return {"exit_code": driver.exit_code, "stopped_on_time": self.stopped, "seconds": wall,
                "terminal_rows": rows, "terminal_rows_per_kill": rows / kills if kills else None,
                "frames": s["frames"], "updates": s["updates"],
                "frames_per_s": frames / wall if wall > 0 else 0.0,
                "updates_per_s": updates / wall if wall > 0 else 0.0,
                "kills": dict(self.kills), "kills_skipped": dict(self.skipped),
                "kills_not_seen_restarted": {role: sum(1 for r, _ in self.pending if r == role) for role in self.kills},
                "restart_seen_after_s": {role: [round(d, 1) for d in ds] for role, ds in self.detect_delays.items()},
                "restarts": {"workers": s["runner_restarts"], "shards": s["shard_restarts"],
                             "learner": s["learner_restarts"]},
                "steps_lost": s["steps_lost"], "ratio": s["ratio"], "target_ratio": s["target_ratio"],
                "memory_mb": [dataclasses.asdict(p) | {"since": round(p.since - self.t0, 1), "grew": p.grew(),
                                                       "killed_at_end": (p.role, p.index) in self.pending}
                              for p in procs],
                "ray_processes_mb": {"start": self.ray_start_mb, "end": self.ray_end_mb}}


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:>3d}:{s:02d}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def report(f: dict[str, Any], config: Any, out=print) -> None:
    minutes = f["seconds"] / 60
    if f["stopped_on_time"]:
        out(f"\nstopped after {minutes:.1f} minutes (exit code {f['exit_code']}: stopped like Ctrl-C, "
            f"final checkpoint written)")
    else:
        out(f"\nthe run ended by itself after {minutes:.1f} minutes with exit code {f['exit_code']}")
    out(f"frames        {f['frames']:>12,}   {f['frames_per_s']:,.1f} frames/s from the first loop turn")
    out(f"updates       {f['updates']:>12,}   {f['updates_per_s']:.2f} updates/s")
    r, k = f["restarts"], f["kills"]
    out(f"restarts      workers {r['workers']} (of {k['worker']} killed), shards {r['shards']} (of {k['shard']} "
        f"killed), learner {r['learner']}")
    for role, delays in f["restart_seen_after_s"].items():
        if delays:
            out(f"              {ROLE_NAMES[role]} restarts seen by the driver {min(delays):.1f} to "
                f"{max(delays):.1f} s after the kill (median {sorted(delays)[len(delays) // 2]:.1f} s)")
        unseen = f["kills_not_seen_restarted"][role]
        if unseen:
            out(f"              {unseen} {ROLE_NAMES[role]} kill(s) not seen restarted by the end")
    out(f"steps lost    {f['steps_lost']:>12,}   (acknowledged by shards after their last checkpoint)")
    per_kill = f["terminal_rows_per_kill"]
    out(f"terminal rows {f['terminal_rows']:>12,}   printed by the run ({COLUMNS} columns, the soak's own lines "
        f"not counted)" + (f", {per_kill:.1f} per kill" if per_kill is not None else ""))
    target = f["target_ratio"]
    out(f"replay ratio  {f['ratio']:>12.3f}   samples per insert, target "
        + (f"{target:g} ({100 * (f['ratio'] / target - 1):+.1f}%), tolerance {config.replay.tolerance:g}"
           if target else "0 (limiter off)"))
    out(f"\nresident memory (RSS, MB), every {SAMPLE_SECONDS:g} s; start: when the process was first seen "
        f"(a restarted one: its restart); settled: {SETTLE_SECONDS:g} s later")
    out(f"{'process':<18} {'pid':>8} {'restarts':>8} {'since':>8} {'start':>8} {'settled':>8} {'end':>8} "
        f"{'peak':>8} {'growth':>8}")
    warnings = []
    for p in f["memory_mb"]:
        label = p["role"] if p["index"] is None else f"{p['role']} {p['index']}"
        label += " (killed)" if p["killed_at_end"] else ""
        base = p["settled"] if p["settled"] is not None else p["start"]
        growth = f"{round(p['end'] - base) + 0:+,d}" if base is not None and p["end"] is not None else "-"
        out(f"{label:<18} {p['pid']:>8} {p['incarnation']:>8} {_clock(max(p['since'], 0)):>8} {_mb(p['start']):>8} "
            f"{_mb(p['settled']):>8} {_mb(p['end']):>8} {_mb(p['peak']):>8} {growth:>8}")
        if p["grew"]:
            warnings.append(f"WARNING: {label} (pid {p['pid']}) grew from {p['settled']:,.0f} MB (settled) to "
                            f"{p['end']:,.0f} MB, more than {100 * GROWTH_SHARE:.0f}% + {GROWTH_MB:g} MB")
    start, end = f["ray_processes_mb"]["start"], f["ray_processes_mb"]["end"]
    if start and end:
        out(f"all of Ray's processes (the driver's descendants): {start[0]:,.0f} MB in {start[1]} processes at the "
            f"start, {end[0]:,.0f} MB in {end[1]} at the end")
    for line in warnings:
        out(line)
    if not warnings:
        out(f"no process grew by more than {100 * GROWTH_SHARE:.0f}% + {GROWTH_MB:g} MB after it settled")


def run(rest: list[str], as_json: bool = False) -> int:
    args, config = parse(rest)
    as_json = as_json or args.json

    print(f"soak: {config.env.task} from {config.env.obs}, presets {'+'.join(args.preset)}, {config.num_actors} "
          f"workers x {config.envs_per_actor} envs, {config.num_shards} shards, checkpoint every "
          f"{config.learner.checkpoint_minutes:g} min; {args.minutes:g} minutes; SIGKILL a worker "
          + (f"every {args.kill_actor_every:g} s" if args.kill_actor_every else "never")
          + ", a shard " + (f"every {args.kill_shard_every:g} s" if args.kill_shard_every else "never"),
          file=sys.stderr if as_json else sys.stdout, flush=True)
    soak = Soak(args.minutes, args.kill_actor_every, args.kill_shard_every, seed=args.seed)
    with soak.rows:
        driver, _ = drive_in_new_run(config, args.logdir, soak, "choreo-bench-soak-", as_json)
    if soak.t0 is None:
        raise SystemExit(f"{PROG}: the run ended before its first loop turn (exit code {driver.exit_code})")
    figures = soak.figures(driver)
    if as_json:
        print(json.dumps(figures, indent=2))
    else:
        report(figures, config)
    return 0 if soak.stopped and driver.exit_code == 130 else 1
