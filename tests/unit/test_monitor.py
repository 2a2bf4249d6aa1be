"""The progress line: time left in readable units, the loss only once there is one, and scalars
that TensorBoard would choke on left out."""

from __future__ import annotations

import io
import math

from choreo.launch.monitor import Monitor, _duration, loss_note


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
