"""choreo: unsupervised skill learning with world models (Choreographer, DADS) on Ray.

The installed package maps the repository's folders: `choreo.agents` (algorithms), `choreo.actors`
(environment workers), `choreo.buffer` (replay), `choreo.learner` (the learner) and
`choreo.launch` (composition root: command line, builder, run loops). This folder holds only the
package root and `choreo.vocabulary`, the names every role shares.

From Python, a pretraining snapshot is one call away (see `choreo.launch.runtime.snapshot`):

    import choreo
    pre = choreo.load_snapshot("runs/<run>/snapshots/snapshot_2000000.pt")
    out = pre.run_skills([0, 1, 2], steps=100)

`load_snapshot` and `Pretrained` load on first use, so that `import choreo` stays cheap (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from choreo.launch.runtime.snapshot import Pretrained, load_snapshot

_LAZY = {"load_snapshot": "choreo.launch.runtime.snapshot", "Pretrained": "choreo.launch.runtime.snapshot"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Pretrained", "__version__", "load_snapshot"]
