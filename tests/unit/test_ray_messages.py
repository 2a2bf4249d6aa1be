"""Ray's own messages to the driver (the raylet's reports of worker deaths and task retries, its
log records) go to the run directory's file, not the terminal, unless CHOREO_RAY_LOGS=1."""

from __future__ import annotations

import logging

from choreo.launch.runtime import ray_runtime


def _report(worker) -> None:
    worker.print_to_stdstream({"lines": ["A worker died or was killed while executing a task"], "pid": "raylet",
                               "is_err": False}, ignore_prefix=False)
    logging.getLogger("ray").warning("Unhandled error: the call's process died")


def test_ray_messages_go_to_the_file_and_come_back_after_shutdown(tmp_path, monkeypatch, capsys):
    from ray._private import worker

    monkeypatch.delenv(ray_runtime.RAY_MESSAGES_ENV, raising=False)
    original = worker.print_to_stdstream
    path = tmp_path / "ray.log"
    assert ray_runtime._diverted(path) and not ray_runtime._diverted(None)
    ray_runtime._divert_messages(path)
    try:
        _report(worker)
    finally:
        ray_runtime.shutdown_ray()  # undoes the diversion (Ray itself was never started here)
    captured = capsys.readouterr()
    assert "worker died" not in captured.out + captured.err and "Unhandled" not in captured.out + captured.err
    text = path.read_text()
    assert "(raylet) A worker died" in text and "Unhandled error" in text
    assert worker.print_to_stdstream is original


def test_choreo_ray_logs_keeps_them_on_the_terminal(tmp_path, monkeypatch, capsys):
    from ray._private import worker

    monkeypatch.setenv(ray_runtime.RAY_MESSAGES_ENV, "1")
    path = tmp_path / "ray.log"
    assert not ray_runtime._diverted(path)
    ray_runtime._divert_messages(path)
    _report(worker)
    assert not path.exists()
    assert "A worker died" in capsys.readouterr().out
