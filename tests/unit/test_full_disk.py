"""Writes that fail (a full disk, the file-size limit): the previous file stays whole, one line names
the file and why, says which checkpoint is the last good one, and the run goes on or stops cleanly;
a learner checkpoint is never written beside a replay that failed to be written."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from choreo.buffer.shard import ReplayShard
from choreo.launch import cli
from choreo.learner.snapshot import atomic_torch_save
from choreo.vocabulary import WriteFailed, write_failed, write_atomically

TINY_RUN = ["--preset", "tiny", "--local", "learner.total_frames=600", "learner.snapshot_frames=[300]"]


def test_the_reason_is_named():
    assert str(write_failed("/r/checkpoint.pt", OSError(errno.ENOSPC, "No space left on device"))).startswith(
        "cannot write /r/checkpoint.pt: the disk is full")
    assert "file-size limit" in str(write_failed("/r/x", OSError(errno.EFBIG, "File too large")))
    other = write_failed("/r/x", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5 vs 4"))
    assert str(other).startswith("cannot write /r/x: ") and "\n" not in str(other)
    assert isinstance(other, OSError)


def test_a_failed_torch_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def short_write(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 505792 vs 505684")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr("shutil.disk_usage", lambda p: types.SimpleNamespace(free=512))
    with pytest.raises(WriteFailed, match=r"cannot write .*checkpoint\.pt: the disk is full \(512 bytes free\)"):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("writer", ["shard", "file"])
def test_other_writers_leave_the_previous_file_whole(tmp_path, monkeypatch, writer):
    shard = ReplayShard(1000, 0, "shard0")
    if writer == "shard":
        path = shard.save(tmp_path)
        write = lambda: shard.save(tmp_path)  # noqa: E731
    else:
        path = tmp_path / "summary.json"
        write_atomically(path, b"{}")
        write = lambda: write_atomically(path, b'{"new": 1}')  # noqa: E731
    before = path.read_bytes()
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WriteFailed, match=rf"cannot write {path}: the disk is full"):
        write()
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _limited(limit: int):
    def start() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return start


def test_a_run_under_a_file_size_limit_says_what_failed_and_stops_cleanly(tmp_path):
    """Nothing fits under 64 kB but the config and the event file: the snapshot, the replay and so
    the final checkpoint fail; each failure is one line, there is no traceback, no temporary file
    is left, and the exit status says the run's end is not on disk."""
    out = subprocess.run([sys.executable, "-m", "choreo.launch.cli", "pretrain", *TINY_RUN,
                          "--logdir", str(tmp_path), "run_name=r"],
                         capture_output=True, text=True, timeout=600, preexec_fn=_limited(64 << 10),
                         env={**os.environ, "MUJOCO_GL": "egl"})
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    run = tmp_path / "r"
    assert f"cannot write {run / 'snapshots' / 'snapshot_300.pt'}: the file-size limit was reached" in text
    assert "the run goes on without it" in text
    final = [line for line in text.splitlines() if line.startswith("could not write the final checkpoint")]
    assert len(final) == 1 and f"{run / 'replay' / 'shard0.msgpack'}" in final[0], text[-3000:]
    assert "there is no checkpoint of this run yet" in final[0]
    assert not (run / "checkpoint.pt").exists()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_a_failed_replay_write_keeps_the_last_checkpoint_pair(tmp_path, monkeypatch, capsys):
    assert cli.main(["pretrain", *TINY_RUN, "--logdir", str(tmp_path), "run_name=r"]) == 0
    run = tmp_path / "r"
    checkpoint = (run / "checkpoint.pt").read_bytes()

    def full(self, directory):
        raise write_failed(Path(directory) / f"{self.name}.msgpack", OSError(errno.ENOSPC, "No space left"))

    monkeypatch.setattr(ReplayShard, "save", full)
    capsys.readouterr()
    assert cli.main(["pretrain", "--local", "--resume", str(run), "learner.total_frames=800"]) == 1
    text = capsys.readouterr().out
    assert f"cannot write {run / 'replay' / 'shard0.msgpack'}: the disk is full" in text
    assert f"the last good one is {run / 'checkpoint.pt'}, at 600 frames" in text
    # the learner's checkpoint was not written beside a replay that is not on disk
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
