"""The one place seeds are derived: every actor, environment and shard seed comes from the run's
root seed and a role path, so runs reproduce and no two components share a random stream."""

from __future__ import annotations

import hashlib


def derive_seed(root: int, *path: str | int) -> int:
    """A 31-bit seed for the component named by `path`, e.g. derive_seed(0, "actor", 3, "env", 1).

    Hash-based (not root + i), so neighbouring roots and indices give unrelated streams.
    """
    text = "/".join([str(int(root)), *map(str, path)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFFFFFF
