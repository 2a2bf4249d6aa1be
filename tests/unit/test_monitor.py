"""The progress line: time left in readable units, the loss labelled and only once there is one, a
line that fits the terminal and is redrawn in place, plain lines at an interval elsewhere, a count
that never passes its total; scalars that TensorBoard would choke on left out; the first line's
estimate timed robustly."""

from __future__ import annotations

import io
import math
import os
import re
import shutil

import pytest

from choreo.launch.runtime.monitor import CLEAR_TO_END, Monitor, Pace, _duration, loss_note


def test_duration_units():
    assert _duration(59) == "0m59s"
    assert _duration(3 * 3600 + 5 * 60 + 7) == "3h05m"
    assert _duration(2 * 86400 + 4 * 3600 + 59) == "2d04h"
    assert _duration(float("inf")) == "?"
    assert _duration(10**12) == "?"  # a run sized to be stopped by hand


def test_loss_note_only_after_the_first_update():
    assert loss_note({}) == ""
    assert loss_note({"world_model/loss": 3.14159}) == "wm loss 3.14"
    assert loss_note({"dynamics/loss": 2.5}) == "dynamics loss 2.50"  # DADS: its skill dynamics' loss


def test_progress_line_and_finite_scalars(tmp_path):
    stream = io.StringIO()
    monitor = Monitor(tmp_path, total_frames=1000, stream=stream)
    monitor.progress(250, 10, "wm loss 1.00", force=True)
    line = stream.getvalue()
    assert "250/1,000 frames (25%)" in line and "wm loss 1.00" in line and line.endswith("\n")
    written = []
    monitor.writer.add_scalar = lambda key, value, step: written.append(key)
    monitor.scalars({"a": 1.0, "b": math.nan, "c": math.inf, "d": None}, 5)
    assert written == ["a"]
    monitor.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rates_are_measured_over_a_window_not_between_two_calls(tmp_path):
    clock = Clock()
    monitor = Monitor(tmp_path, total_frames=10**6, stream=io.StringIO(), rate_window=30.0, clock=clock)
    monitor.start_rates(5000, 200)  # a resumed run: its rates count from where it was
    frames, updates, seen = 5000, 200, []
    for tick in range(1, 121):  # logs every half second; 10 updates land every 5 s, frames flow steadily
        clock.now += 0.5
        frames += 50
        if tick % 10 == 0:
            updates += 10
        seen.append(monitor.rates(frames, updates))
    fps, ups = zip(*seen)
    assert fps[0] == pytest.approx(100.0)  # not (5050 - 0) / 0.5 s
    # Once the window is full (30 to 31 s between records), the true rate of 2 updates/s within one
    # burst either way; between two calls it would read 0 nine times in ten and 40 otherwise.
    late = ups[62:]
    assert min(late) >= (60 - 10) / 31 and max(late) <= (60 + 10) / 30
    assert all(f == pytest.approx(100.0) for f in fps)
    assert len(monitor._counts) <= 33  # records a second apart, over the window
    monitor.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(text: str) -> list[str]:
    """What each redraw showed: the text between carriage returns, without the clear-to-end."""
    return [part.replace(CLEAR_TO_END, "").rstrip("\n") for part in text.split("\r") if part]


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_a_terminal_gets_one_redrawn_line_that_fits_its_width(tmp_path, monkeypatch, columns):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((columns, 24)))
    clock, stream = Clock(), Terminal()
    monitor = Monitor(tmp_path, total_frames=100_000, stream=stream, clock=clock)
    pace = Pace(100_000, 10.0, 2, clock=clock)
    pace.update(40_000, 4_000, 0.0, 0.0)
    clock.now += 600.0
    pace.update(52_340, 5_234, 900.0, 0.0)
    monitor.progress(52_340, 5_234, ["wm loss 1.23", "2 worker restarts"], force=True, pace=pace)
    (line,) = redraws(stream.getvalue())
    assert stream.getvalue().startswith("\r") and stream.getvalue().endswith(CLEAR_TO_END)
    assert "\n" not in stream.getvalue()  # redrawn in place, nothing scrolls
    assert len(line) < columns and line == line.strip()  # no padding to wrap on
    assert "52,340/100,000 frames (52%)" in line
    assert line.startswith("[#########") == (columns >= 200)  # the bar goes first when space is short
    if columns >= 80:  # the time left and the labelled loss come before the rates and the bar
        assert "left " in line and "wm loss 1.23" in line
    if columns >= 200:
        assert "fps" in line and "upd/s" in line and "(learner-bound)" in line and "2 worker restarts" in line
    monitor.close()
    assert stream.getvalue().endswith("\n")  # the last redraw stays, what follows starts below it


def test_the_width_is_read_again_at_every_redraw(tmp_path, monkeypatch):
    width = {"columns": 200}
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((width["columns"], 24)))
    clock, stream = Clock(), Terminal()
    monitor = Monitor(tmp_path, total_frames=1000, stream=stream, clock=clock)
    monitor.progress(100, 1, ["wm loss 1.00", "warm-up"], force=True)
    width["columns"] = 30  # the window was made narrower
    monitor.progress(200, 2, ["wm loss 1.00", "warm-up"], force=True)
    wide, narrow = redraws(stream.getvalue())
    assert len(wide) > 30 and len(narrow) < 30 and narrow.startswith("200/1,000 frames")
    width["columns"] = 10  # narrower than the count itself: cut, never wrapped
    monitor.progress(300, 3, force=True)
    assert len(redraws(stream.getvalue())[-1]) == 9
    monitor.close()


def test_elsewhere_plain_lines_come_at_the_interval_and_at_the_end(tmp_path):
    clock, stream = Clock(), io.StringIO()
    monitor = Monitor(tmp_path, total_frames=10_000, stream=stream, plain_interval=30.0, clock=clock)
    for second in range(100):
        monitor.progress(100 * second, second, "wm loss 2.00")
        clock.now += 1.0
    monitor.progress(10_000, 100, ["wm loss 1.50", "done"], force=True)  # the run's end
    monitor.close()
    lines = stream.getvalue().splitlines(keepends=True)
    assert len(lines) == 5  # at 0, 30, 60 and 90 s, and the end
    assert all(line.endswith("\n") and "\r" not in line and CLEAR_TO_END not in line for line in lines)
    assert lines[1].startswith("3,000/10,000 frames (30%)") and "wm loss 2.00" in lines[1]
    assert lines[-1].startswith("10,000/10,000 frames (100%)") and lines[-1].rstrip().endswith("done")


def test_the_count_never_passes_its_total(tmp_path):
    clock, stream = Clock(), io.StringIO()
    monitor = Monitor(tmp_path, total_frames=100_000, stream=stream, clock=clock)
    clock.now += 1000.0
    monitor.progress(100_010, 10_001, ["wm loss 0.90", "done"], force=True)  # a worker's last call went past
    line = stream.getvalue()
    assert "100,000/100,000 frames (100%)" in line
    assert not any(int(n.replace(",", "")) > 100_000 for n in re.findall(r"[\d,]{5,}", line))
    monitor.close()
    updates = Monitor(tmp_path, total_frames=200, stream=(stream := io.StringIO()), unit="updates")
    updates.progress(203, 203, force=True)
    assert "200/200 updates (100%)" in stream.getvalue() and "fps" not in stream.getvalue()
    updates.close()


def test_the_first_line_estimate_rests_on_the_fastest_of_many_updates_after_a_warm_up():
    """A machine busy for a moment (other processes on the cores) makes some updates 30 times
    slower: the estimate keeps what the machine does once they are done."""
    from choreo.launch.runtime.machine import time_updates

    def timed(durations: list[float], **limits):
        now, left = [0.0], iter(durations)

        def update() -> None:
            now[0] += next(left)

        return time_updates(update, clock=lambda: now[0], **limits), now[0]

    # 2 warm-up updates, then a busy moment: the fewest timed updates, and not one more past the budget
    timing, spent = timed([5.0, 3.0, 12.0, 12.0, 0.4, 12.0, 0.41, 9.9], warmup=2, fewest=5, most=30, budget=5.0)
    assert timing.seconds == pytest.approx(0.4) and timing.count == 5 and timing.median == pytest.approx(12.0)
    assert spent == pytest.approx(8.0 + 36.81)
    # a quiet machine: timed until the budget is spent, at most `most` updates
    timing, _ = timed([1.0] + [0.5] * 100, warmup=1, fewest=5, most=30, budget=5.0)
    assert timing.seconds == pytest.approx(0.5) and timing.count == 10
    timing, _ = timed([0.01] * 100, warmup=0, fewest=5, most=30, budget=5.0)
    assert timing.count == 30


def test_the_first_line_says_what_its_estimate_rests_on(monkeypatch):
    from choreo.launch.runtime import machine
    from choreo.launch.runtime.config import load_config

    monkeypatch.setattr(machine, "seconds_per_update", lambda config: machine.UpdateTiming(0.4, 0.45, 12))
    config = load_config(["small"], ["learner.device=cpu"])
    updates, seconds, _, share = machine.run_estimate(config)
    line = machine.first_line(config, "no GPU here: the small size")
    assert f"{updates:,} updates x 0.4 s, the fastest of 12 updates timed on this machine after a warm-up" in line
    assert f"x {share:g} for the cores the workers share" in line
    assert "the progress line's estimate follows once the run has its pace" in line
    assert seconds == pytest.approx(machine.START_SECONDS + updates * 0.4 * share)
    assert "busy" not in line
    # other processes busy on the cores all along: no choice of updates helps, the line says so
    monkeypatch.setattr(machine, "seconds_per_update", lambda config: machine.UpdateTiming(5.1, 5.3, 5, 0.8))
    line = machine.first_line(config, "no GPU here: the small size")
    assert "x 5.1 s, the fastest of 5 updates" in line and "other processes kept 80% of the" in line
    assert line.endswith("the progress line's estimate follows once the run has its pace")
    cpu = machine._cpu_seconds()  # Linux: every core's busy and total seconds
    assert cpu is None or 0 <= cpu[0] <= cpu[1]
