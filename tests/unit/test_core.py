"""The run core, without Ray: the ratio trained on holds whatever an update costs, grants are
counted only once trained, a replaced learner's batches are given back, the time left follows the
pace the limiter allows, and the exit messages say what happened and how to continue."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from choreo.launch.runtime.config import load_config
from choreo.launch.runtime.core import MAX_OUTSTANDING_BATCHES, RunCore
from choreo.launch.runtime.monitor import Monitor, Pace

TARGET, TOLERANCE = 4.0, 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_core(tmp_path: Path, clock: Clock, total_frames: int = 10**9, **replay) -> RunCore:
    overrides = [f"replay.{k}={v}" for k, v in {"samples_per_insert": TARGET, "tolerance": TOLERANCE, **replay}.items()]
    config = load_config(["tiny"], [f"learner.total_frames={total_frames}", *overrides])
    monitor = Monitor(tmp_path, config.learner.total_frames, stream=io.StringIO())
    return RunCore(config, tmp_path, num_workers=2, action_repeat=1, counters=None, updates=0,
                   local=False, monitor=monitor, clock=clock)


def simulate(core: RunCore, clock: Clock, update_seconds: float, call_seconds: float, seconds: float,
             workers: int = 2, call_steps: int = 10, learner_call: float = 1.0) -> tuple[list[float], int]:
    """Workers whose calls take `call_seconds` and a learner whose updates take `update_seconds`,
    driven through the core as the Ray loop drives them: a learner call trains on the batches it
    holds until `learner_call` seconds passed (never breaking off an update) and reports how many
    it trained on. Returns the ratio measured independently of the limiter (trained sampled steps
    over steps inserted past the warm-up) after every tick once there is one, and the updates."""
    busy_until: dict[int, float | None] = {w: None for w in range(workers)}
    held, call_ends, call_batches = 0, None, 0
    min_size = core.config.replay.min_size
    inserted = trained = 0
    ratios = []
    while clock.now < seconds:
        clock.now = round(clock.now + 0.05, 6)
        for w, until in busy_until.items():
            if until is not None and clock.now >= until:
                busy_until[w] = None
                core.collected(call_steps, version=core.version)
                inserted += call_steps
            if busy_until[w] is None and core.may_collect(w, call_steps):
                busy_until[w] = clock.now + call_seconds
        if call_ends is not None and clock.now >= call_ends:
            held -= call_batches
            trained += call_batches
            core.trained(call_batches, core.updates + call_batches)
            call_ends = None
        if call_ends is None and ((grant := core.grant()) or core.outstanding):
            held += grant
            call_batches = min(held, max(1, int(-(-learner_call // update_seconds))))
            call_ends = clock.now + call_batches * update_seconds
        if inserted > min_size:
            ratios.append(trained * core.batch_steps / (inserted - min_size))
    return ratios, trained


def insert(core: RunCore, steps: int, worker: int = 0) -> None:
    assert core.may_collect(worker, steps)
    core.collected(steps, version=-1)


@pytest.mark.parametrize("update_seconds", [0.05, 0.5, 2.0, 20.0])
def test_ratio_trained_on_holds_whatever_an_update_costs(tmp_path, update_seconds):
    """From 20 ms to 20 s per update (a learner call returns after 1 s): the ratio of what was
    trained on stays in the band once the inserts past the warm-up outnumber a few batches."""
    clock = Clock()
    core = make_core(tmp_path, clock)
    ratios, updates = simulate(core, clock, update_seconds, call_seconds=0.2,
                               seconds=max(120.0, 60 * update_seconds))
    assert updates >= 20
    settled = ratios[len(ratios) // 3:]
    assert min(settled) >= TARGET * (1 - TOLERANCE) - 1e-9
    assert max(settled) <= TARGET * (1 + TOLERANCE) + 1e-9
    assert core.limiter.ratio() == pytest.approx(ratios[-1])  # the limiter's ratio is what was trained on
    assert core.outstanding <= MAX_OUTSTANDING_BATCHES


def test_grants_are_counted_only_once_trained(tmp_path):
    clock = Clock()
    core = make_core(tmp_path, clock, min_size=0)
    insert(core, 1000)
    assert core.grant() == MAX_OUTSTANDING_BATCHES
    assert core.grant() == 0 and core.outstanding == MAX_OUTSTANDING_BATCHES
    assert core.limiter.stats()["sampled"] == 0 and core.limiter.ratio() == 0.0
    core.trained(1, updates=1)
    assert core.limiter.stats()["sampled"] == core.batch_steps and core.outstanding == 3
    assert core.grant() == 1  # one more may be held
    core.learner_replaced(updates=0)  # the replacement redoes the update: its samples are uncounted
    assert core.outstanding == 0 and core.limiter.stats()["sampled"] == 0
    assert core.limiter.reserved == (0, 0)


def test_workers_are_held_while_the_learner_is_behind(tmp_path):
    clock = Clock()
    core = make_core(tmp_path, clock, min_size=0)
    assert core.may_collect(0, 200)
    assert not core.may_collect(1, 10)  # the first call's steps count before they arrive
    core.collected(200, version=-1)
    # 200 steps at 4 samples per step: 20 batches of 40 steps; none trained yet
    assert not core.may_collect(0, 10) and not core.may_collect(1, 10)
    while core.limiter.stats()["sampled"] < TARGET * (1 - TOLERANCE) * 210:
        clock.now += 1.0
        core.trained(core.grant(), core.updates + 1)
    clock.now += 1.0
    assert core.may_collect(0, 10)
    workers_held, _ = core.held_seconds()
    assert clock.now >= 4.0
    # both waited from their refusal at 0 s until now (worker 1 still waits): ongoing waits count too
    assert workers_held == pytest.approx(2 * clock.now)


def test_pace_of_a_learner_bound_run():
    """0.05 updates/s at 10 frames per update: 0.5 frames/s, whatever the warm-up's burst was."""
    clock = Clock()
    pace = Pace(total_frames=2_000_000, frames_per_update=10.0, num_workers=2, clock=clock)
    frames, updates = 4000, 0  # right after a warm-up that went at thousands of frames/s
    for minute in range(30):
        clock.now = 60.0 * minute
        # the learner sets the pace: both workers wait about 90% of the time, the learner never
        pace.update(frames, updates, workers_held_s=2 * 0.9 * clock.now, learner_held_s=0.0)
        frames, updates = frames + 30, updates + 3
    assert pace.bound() == "learner"
    fps, ups = pace.rates()
    assert ups == pytest.approx(0.05) and fps == pytest.approx(0.5)
    left = pace.seconds_left(frames)
    assert left == pytest.approx((2_000_000 - frames) / 0.5, rel=1e-6)  # about 46 days
    assert 45 * 86400 < left < 47 * 86400


def test_pace_of_a_worker_bound_run():
    clock = Clock()
    pace = Pace(total_frames=100_000, frames_per_update=10.0, num_workers=2, clock=clock)
    for second in range(0, 700, 10):
        clock.now = float(second)
        pace.update(100 * second, 5 * second, workers_held_s=0.0, learner_held_s=0.5 * second)
    assert pace.bound() == "workers"
    assert pace.seconds_left(50_000) == pytest.approx(50_000 / 100.0)
    assert Pace(100, 0.0, 1, clock=clock).seconds_left(0) == float("inf")  # no rate yet


def test_progress_line_names_the_bottleneck(tmp_path):
    clock = Clock()
    stream = io.StringIO()
    monitor = Monitor(tmp_path, 1000, stream=stream)
    pace = Pace(1000, 10.0, 1, clock=clock)
    pace.update(0, 0, 0.0, 0.0)
    clock.now = 100.0
    pace.update(50, 5, 80.0, 0.0)
    monitor.progress(50, 5, "loss 1.00", force=True, pace=pace)
    assert "(learner-bound)" in stream.getvalue() and "left 31m40s" in stream.getvalue()
    monitor.close()


def test_exit_messages(tmp_path, capsys):
    clock = Clock()
    core = make_core(tmp_path, clock)
    core.frames = 1234
    assert core.finish("interrupted", lambda: None) == 130
    out = capsys.readouterr().out
    assert f"checkpoint written at 1,234 frames; continue with: choreo pretrain --resume {tmp_path}" in out

    core = make_core(tmp_path, clock)

    def broken() -> None:
        raise OSError("No space left on device")

    assert core.finish("interrupted", broken) == 130
    out = capsys.readouterr().out
    assert "could not write the final checkpoint (OSError: No space left on device)" in out
    assert "there is no checkpoint of this run yet" in out

    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    core = make_core(tmp_path, clock)
    core.frames = 500
    core.checkpointed()
    core.frames = 900
    assert core.finish("done", broken) == 1  # finished, but its end is not on disk
    out = capsys.readouterr().out
    assert f"the last good one is {tmp_path / 'checkpoint.pt'}, at 500 frames" in out

    core = make_core(tmp_path, clock)
    assert core.finish("nonfinite", None, "5 updates in a row were non-finite") == 1
    out = capsys.readouterr().out
    assert "the run stopped: 5 updates in a row were non-finite" in out
    assert "no checkpoint was written after the non-finite updates" in out


def test_nothing_is_granted_or_collected_once_stopping(tmp_path):
    clock = Clock()
    core = make_core(tmp_path, clock, min_size=0)
    insert(core, 1000)
    core.stop("interrupted")
    assert core.grant() == 0 and not core.may_collect(0, 10)


def test_logged_updates_per_second_is_a_rate_over_a_window(tmp_path):
    """The loops log every few seconds and at every episode end, often with no learner call in
    between: the scalar is measured over the last RATE_WINDOW seconds, not since the previous log."""
    from choreo.launch.runtime.monitor import RATE_WINDOW

    clock = Clock()
    config = load_config(["tiny"])
    core = RunCore(config, tmp_path, num_workers=1, action_repeat=1, counters={"frames": 4000}, updates=300,
                   local=True, clock=clock)
    written: list[tuple[str, float, int]] = []
    core.monitor.writer.add_scalar = lambda key, value, step: written.append((key, value, step))
    for tick in range(1, 4 * int(RATE_WINDOW) + 1):  # a log every second; 40 updates every 8 s
        clock.now += 1.0
        core.frames += 10
        if tick % 8 == 0:
            core.updates += 40
        core.log()
    ups = [v for k, v, _ in written if k == "throughput/updates_per_second"]
    fps = [v for k, v, _ in written if k == "throughput/frames_per_second"]
    assert len(ups) == 4 * int(RATE_WINDOW)
    assert fps[0] == pytest.approx(10.0)  # counted from the resumed run's frames, not from 0
    late = ups[int(RATE_WINDOW) + 1:]
    assert min(late) > 0 and max(late) / min(late) < 1.5  # steady around 5/s, never 0
    assert np.mean(late) == pytest.approx(5.0, rel=0.15)
    core.monitor.close()


def test_no_evaluation_of_the_schedule_is_skipped_however_long_one_takes(tmp_path):
    clock = Clock()
    config = load_config(["tiny"], ["learner.total_frames=10000", "eval.every_frames=200", "replay.samples_per_insert=0"])
    core = RunCore(config, tmp_path, num_workers=1, action_repeat=1, counters=None, updates=0, local=False,
                   monitor=Monitor(tmp_path, 10000, stream=io.StringIO()), clock=clock)
    assert core.eval_due() and core.start_eval() == 0
    for _ in range(19):  # collection goes on while the evaluation of frame 0 runs ...
        insert(core, 10)
    assert core.may_collect(0, 10)
    core.collected(10, version=-1)
    assert core.frames == 200 and not core.may_collect(0, 10)  # ... up to the next evaluation's frame
    core.evaluated(0, [1.0])
    assert core.eval_due() and core.start_eval() == 200  # the evaluation of frame 200 is not skipped
    assert core.may_collect(0, 10)
