"""A Ctrl-C whose KeyboardInterrupt is swallowed by library code is raised again at the next boundary."""

import os
import signal

import pytest

from compress import interrupts


def test_a_swallowed_interrupt_is_raised_at_the_next_check():
    previous = signal.getsignal(signal.SIGINT)
    try:
        interrupts.install()
        interrupts.check()  # nothing pressed yet
        swallowed = False
        try:  # what a library with a catch-all does to the first KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs between bytecodes, here
        except BaseException:  # noqa: BLE001 - the point of the test
            swallowed = True
        assert swallowed
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts._received = False
