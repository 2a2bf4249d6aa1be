"""The driver's signal handler: the first SIGTERM or SIGINT ends the run like Ctrl-C (KeyboardInterrupt,
then a final checkpoint); a second one while the run is stopping must not cut that checkpoint short."""

from __future__ import annotations

import os
import signal
import time

import pytest

from choreo.launch.runtime import signals


@pytest.fixture
def handlers():
    """The handlers installed, from a clean state; this process's own handlers restored afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signals.reset_interrupt()
    signals.interrupt_on_sigterm()
    try:
        yield
    finally:
        signals.reset_interrupt()
        for s, handler in saved.items():
            signal.signal(s, handler)


def _send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in the main thread at its next bytecode boundary: here at the latest


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
                         ids=["term-term", "int-int", "term-int", "int-term"])
def test_first_signal_interrupts_and_a_second_one_only_says_the_run_is_stopping(handlers, capfd, first, second):
    with pytest.raises(KeyboardInterrupt):
        _send(first)
    assert capfd.readouterr().err == ""

    _send(second)  # the final checkpoint would be being written now: no exception
    _send(second)
    err = capfd.readouterr().err
    assert err.count("already stopping: writing the final checkpoint ...") == 2, err
    assert len(err.splitlines()) == 2


def test_reset_makes_the_next_signal_interrupt_again(handlers, capfd):
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGTERM)
    signals.reset_interrupt()
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGINT)
    assert capfd.readouterr().err == ""


def test_inside_a_loop_the_first_signal_only_asks_it_to_stop(handlers, capfd):
    """A run's loop turns the signal into KeyboardInterrupt between its steps: raised anywhere, it
    could land inside a library's lock (TensorBoard's event queue) and leave it held."""
    with signals.polled():
        _send(signal.SIGTERM)  # no KeyboardInterrupt here
        assert signals.stop_requested()
        _send(signal.SIGINT)
        assert "already stopping" in capfd.readouterr().err
    signals.reset_interrupt()
    assert not signals.stop_requested()
    with pytest.raises(KeyboardInterrupt):  # outside a loop, as before
        _send(signal.SIGTERM)
