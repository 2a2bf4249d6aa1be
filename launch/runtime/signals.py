"""Signals end a run cleanly: the first SIGTERM or SIGINT raises KeyboardInterrupt in the main
thread, so that the loop writes its final checkpoint; later ones only say that it is stopping.

Inside a run's loop (`polled`), the first signal only sets a flag that the loop reads between its
steps (`stop_requested`) and turns into the same KeyboardInterrupt there: raised wherever the main
thread happens to be, it could land inside a library's lock (TensorBoard's event queue takes one
for every scalar), leave the lock held, and the final checkpoint's own logging would wait on it
forever."""

from __future__ import annotations

import contextlib
import os
import signal


_stopping = False
"""Set by the first SIGTERM or SIGINT: the run is stopping (writing its final checkpoint)."""
_polling = False
"""A loop reads `stop_requested` between its steps (`polled`)."""
_requested = False
"""A signal asked the polling loop to stop."""

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
    global _stopping, _requested
    _stopping = _requested = False


@contextlib.contextmanager
def polled():
    """While active, a signal sets `stop_requested` instead of raising (see the module docstring)."""
    global _polling
    previous, _polling = _polling, True
    try:
        yield
    finally:
        _polling = previous


def stop_requested() -> bool:
    """Whether a signal asked the loop (inside `polled`) to stop: it raises KeyboardInterrupt then,
    at a point of its own choosing."""
    return _requested


def _raise_interrupt(signum, frame) -> None:
    global _stopping, _requested
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
    if _polling:
        _requested = True
        return
    raise KeyboardInterrupt
