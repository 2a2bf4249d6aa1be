"""Signals end a run cleanly: the first SIGTERM or SIGINT raises KeyboardInterrupt in the main
thread, so that the loop writes its final checkpoint; later ones only say that it is stopping."""

from __future__ import annotations

import contextlib
import os
import signal


_stopping = False
"""Set by the first SIGTERM or SIGINT: the run is stopping (writing its final checkpoint)."""

ALREADY_STOPPING = "already stopping: writing the final checkpoint ... (kill -KILL {pid} to stop without it)"


def interrupt_on_sigterm() -> None:
    """A scheduler's or a user's SIGTERM, like Ctrl-C (SIGINT), ends the run with a final
    checkpoint: the first of them raises KeyboardInterrupt in the main thread; any later one, while
    the run is stopping and writing that checkpoint, only says so on stderr, so that a second
    signal (schedulers and impatient users send several) cannot cut the checkpoint short.
    (Call again after `ray.init`, which installs a SIGTERM handler of its own.)"""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)


@contextlib.contextmanager
def signals_stop_the_run():
    """`interrupt_on_sigterm` for the duration of a run started in a longer-lived process (tests,
    benchmarks): the previous handlers come back afterwards, and the next run's first signal
    raises again."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupt_on_sigterm()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reset_interrupt()


def reset_interrupt() -> None:
    """Forget an earlier signal: the next SIGTERM or SIGINT raises KeyboardInterrupt again (tests)."""
    global _stopping
    _stopping = False


def _raise_interrupt(signum, frame) -> None:
    global _stopping
    if _stopping:
        # os.write, not print: the handler may run while the main thread is inside a write to
        # sys.stderr, and a buffered stream refuses a reentrant call.
        message = ALREADY_STOPPING.format(pid=os.getpid()) + "\n"
        try:
            os.write(2, message.encode())
        except OSError:
            pass
        return
    _stopping = True
    raise KeyboardInterrupt
