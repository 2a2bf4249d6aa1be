"""The job runner (launch/runtime/jobs.py) in this process, and its progress display: one line
redrawn in place on a terminal within 80 columns, plain lines at intervals otherwise."""

from __future__ import annotations

import io

import pytest

from choreo.launch.runtime import jobs
from choreo.launch.runtime.jobs import WIDTH, Progress, run_jobs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def square_after(log: list, x: int) -> int:
    log.append(x)
    return x * x


def test_local_jobs_run_in_this_process_in_call_order():
    log: list[int] = []
    stream = io.StringIO()
    out = run_jobs(square_after, [(log, 3), (log, 1), (log, 2)], local=True, sizes=[5, 5, 2], stream=stream,
                   label="choreo test")
    assert out == [9, 1, 4] and log == [3, 1, 2]  # the log shows they ran here, one after another
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("choreo test: 0/3 jobs  0/12 episodes")
    assert lines[-1].startswith("choreo test: 3/3 jobs  12/12 episodes")
    assert "\r" not in stream.getvalue()


def test_a_local_job_that_raises_raises_and_ends_the_display():
    stream = Terminal()

    def boom(x: int) -> int:
        raise RuntimeError(f"job {x} broke")

    with pytest.raises(RuntimeError, match="job 1 broke"):
        run_jobs(boom, [(1,)], local=True, stream=stream)
    assert stream.getvalue().endswith("\n")  # the next output starts on a line of its own
    with pytest.raises(ValueError, match="2 sizes for 1 calls"):
        run_jobs(boom, [(1,)], local=True, sizes=[1, 2], stream=stream)


def test_not_a_terminal_plain_lines_at_intervals():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(10, 100, stream=stream, clock=clock)
    progress.update(0, 0, force=True)
    for done in range(1, 10):
        clock.now += 3.0
        progress.update(done, done * 10)
    progress.update(10, 100)
    progress.close()
    lines = stream.getvalue().splitlines()
    # At the start, every LOG_SECONDS (10 s: after 4 jobs at 12 s, 8 jobs at 24 s) and at the end.
    assert [line.split()[0] for line in lines] == ["0/10", "4/10", "8/10", "10/10"]
    assert lines[1] == "4/10 jobs  40/100 episodes  0m12s elapsed  0m18s left"
    assert "left" not in lines[-1] and "\r" not in stream.getvalue()


def test_on_a_terminal_one_line_redrawn_within_80_columns():
    clock, stream = Clock(), Terminal()
    progress = Progress(123_456, 987_654_321, unit="episodes", label="choreo evaluate", stream=stream, clock=clock)
    progress.update(0, 0, force=True)
    clock.now += 0.5
    progress.update(1, 2)  # within REDRAW_SECONDS: not drawn
    clock.now += 123_456.0
    progress.update(12_345, 98_765_432)
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended once
    draws = text.rstrip("\n").split("\r")[1:]
    assert len(draws) == 2
    assert all(len(d) <= WIDTH - 1 for d in draws)
    assert draws[-1].startswith("12,345/123,456 jobs 98,765,432/987,654,321 episodes")  # no room for the label
    assert draws[-1].endswith(" left")
    short = Progress(2, stream=Terminal(), label="choreo plan", clock=clock)
    assert short.line(1, 1, 30.0) == "choreo plan: 1/2 jobs  0m30s elapsed  0m30s left"  # left from jobs alone


def test_a_shorter_line_pads_over_a_longer_one():
    clock, stream = Clock(), Terminal()
    progress = Progress(2, 2, stream=stream, clock=clock)
    progress.update(0, 0, force=True)
    first = stream.getvalue()
    progress._width = longer = len(first) + 10  # as if the previous line had been longer
    progress.update(2, 2)
    last = stream.getvalue()[len(first):]
    assert last.startswith("\r2/2 jobs") and len(last) == 1 + longer and last.endswith(" " * 10)


def test_run_jobs_goes_to_ray_unless_local(monkeypatch):
    seen = {}

    def fake_ray(fn, calls, address, results, progress, size, label, cpus):
        seen.update(address=address, label=label, calls=calls, cpus=cpus)
        for i, call in enumerate(calls):
            results[i] = fn(*call)

    monkeypatch.setattr(jobs, "_run_on_ray", fake_ray)
    assert run_jobs(abs, [(-1,), (-2,)], address="10.0.0.1:6379", label="choreo plan", stream=io.StringIO()) == [1, 2]
    assert seen == {"address": "10.0.0.1:6379", "label": "choreo plan", "calls": [(-1,), (-2,)], "cpus": 1.0}
    run_jobs(abs, [(-1,)], label="runs", stream=io.StringIO(), cpus=2)
    assert seen["cpus"] == 2
