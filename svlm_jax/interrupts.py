"""Ctrl-C in long runs (`svlm stream`, `svlm demo`).

SIGINT raises KeyboardInterrupt, as Python's own handler does, and is also remembered: XLA runs
Python code (jax's gc callback) where Python prints an exception and drops it, so a Ctrl-C that
lands there would be lost and the run would go on. `check()`, called once a second by the loops,
raises a remembered one again. Standard library only: the CLI installs it before importing jax.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_received = False


def _on_sigint(signum, frame):
    global _received
    _received = True
    # Raised inside jax's gc callback, Python would print the exception with its traceback and
    # drop it: there the flag alone stands, and `check()` raises it at the next second.
    if frame is not None and frame.f_code.co_name == "_xla_gc_callback":
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def remembered():
    """The remembering handler for the block (from the main thread; elsewhere signals are not ours)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raises KeyboardInterrupt if Ctrl-C came during the `remembered()` block, a dropped one included."""
    if _received:
        raise KeyboardInterrupt
