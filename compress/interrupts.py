"""Ctrl-C that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be. If that is inside library code that
swallows every exception, or a finalizer run by the garbage collector, the interrupt disappears and the run
goes on to the end (seen once in the test suite). The handler also records it, and `check()` — called at
every stage and subprocess boundary — raises it again.
"""

from __future__ import annotations

import signal

_received = False


def _on_interrupt(_signum, _frame) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def install() -> None:
    global _received
    _received = False
    signal.signal(signal.SIGINT, _on_interrupt)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if its first KeyboardInterrupt was swallowed."""
    if _received:
        raise KeyboardInterrupt
