"""The progress line: time left in readable units, the loss only once there is one, and scalars
that TensorBoard would choke on left out."""

from __future__ import annotations

import io
import math

import pytest

from choreo.launch.runtime.monitor import Monitor, _duration, loss_note


def test_duration_units():
    assert _duration(59) == "0m59s"
    assert _duration(3 * 3600 + 5 * 60 + 7) == "3h05m"
    assert _duration(2 * 86400 + 4 * 3600 + 59) == "2d04h"
    assert _duration(float("inf")) == "?"
    assert _duration(10**12) == "?"  # a run sized to be stopped by hand


def test_loss_note_only_after_the_first_update():
    assert loss_note({}) == ""
    assert loss_note({"world_model/loss": 3.14159}) == "loss 3.14"


def test_progress_line_and_finite_scalars(tmp_path):
    stream = io.StringIO()
    monitor = Monitor(tmp_path, total_frames=1000, stream=stream)
    monitor.progress(250, 10, "loss 1.00", force=True)
    line = stream.getvalue()
    assert "250/1,000 frames" in line and "loss 1.00" in line and "[#####" in line
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
