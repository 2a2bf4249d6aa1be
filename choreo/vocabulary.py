"""The vocabulary every role shares: the batch keys and the seed derivation. It imports nothing of
choreo's, so environment workers, replay, agents and the learner name a key or derive a seed
without importing one another, and a typo is an import error rather than a KeyError three
processes away.

Layout of a training batch (numpy in replay, torch in the learner), B sequences of T steps:
    observation     [B, T, D] float32 (states) or [B, T, 3, 64, 64] uint8 (pixels)
    action          [B, T, A] float32 in [-1, 1]; action[t] is the action that LED TO observation[t]
                    (zeros on the first step of an episode)
    reward          [B, T] float32; reward[t] came with observation[t]
    discount        [B, T] float32; 0 after a true termination, else 1
    is_first        [B, T] bool; observation[t] is a reset observation
    is_last         [B, T] bool; observation[t] ends its episode (terminated or truncated)
    is_terminal     [B, T] bool; observation[t] ends its episode by termination
    skill           [B, T] int32; the skill index held when choosing the action (-1 when none)
    policy_version  [B, T] int64; version of the weights that chose action[t] (-1: random seed actions)

Optional keys, written only by the workers of algorithms whose policies report them (not in KEYS):
    skill_vector    [B, T, D] float32; the skill vector held when choosing action[t] (DADS: a
                    continuous skill in [-1, 1]^D or a one-hot of a discrete one)
    behaviour_logp  [B, T] float32; log-probability of action[t] under the policy that chose it
                    (off-DADS importance weights)

Seeds: every actor, environment and shard seed comes from the run's root seed and a role path
(`derive_seed`), so runs reproduce and no two components share a random stream.

Failed writes: every writer of a run's files (checkpoint, snapshot, replay, dataset, summaries)
writes a temporary file and moves it into place, and turns a failure into `WriteFailed`, whose
one-line message names the file and why (a full disk, the file-size limit), so that whoever
catches it can say so and which earlier file is still good.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil

OBSERVATION = "observation"
ACTION = "action"
REWARD = "reward"
DISCOUNT = "discount"
IS_FIRST = "is_first"
IS_LAST = "is_last"
IS_TERMINAL = "is_terminal"
SKILL = "skill"
POLICY_VERSION = "policy_version"

SKILL_VECTOR = "skill_vector"
BEHAVIOUR_LOGP = "behaviour_logp"

KEYS = (OBSERVATION, ACTION, REWARD, DISCOUNT, IS_FIRST, IS_LAST, IS_TERMINAL, SKILL, POLICY_VERSION)


def derive_seed(root: int, *path: str | int) -> int:
    """A 31-bit seed for the component named by `path`, e.g. derive_seed(0, "actor", 3, "env", 1).

    Hash-based (not root + i), so neighbouring roots and indices give unrelated streams.
    """
    text = "/".join([str(int(root)), *map(str, path)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFFFFFF


class WriteFailed(OSError):
    """A file could not be written; the message names it and why, in one line. The file that was
    at that path before (if any) is intact: writers write a temporary file and then rename it."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()


FULL_DISK_BYTES = 1 << 20
"""Free bytes below which a failed write is put down to a full disk."""


def write_failed(path: str | os.PathLike, exc: BaseException) -> WriteFailed:
    """The WriteFailed for a write of `path` that raised `exc` (an OSError, or a library's own error
    such as torch's for a short write, which names neither the file nor the cause)."""
    code = exc.errno if isinstance(exc, OSError) else None
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)  # the disk the folder would have been made on
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < FULL_DISK_BYTES):
        why = "the disk is full" + (f" ({free:,} bytes free)" if free is not None else "")
    elif code == errno.EFBIG or (code is None and limit != resource.RLIM_INFINITY):
        why = "the file-size limit was reached" + (f" ({limit:,} bytes, ulimit -f)" if limit != resource.RLIM_INFINITY
                                                    else "")
    else:
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[-1][:200]}" if lines else type(exc).__name__
    return WriteFailed(code or errno.EIO, f"cannot write {path}: {why}")


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """`data` to `path` through a synced temporary file beside it that then replaces `path`: a
    reader, or a run resumed after a crash, sees the old file or the new one, never a part. A
    failure raises `WriteFailed` and leaves the old file as it was."""
    path = os.fspath(path)
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
