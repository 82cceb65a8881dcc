"""SIGTERM and SIGINT as an exception (`Interrupted`), held back inside the few steps that must not be cut.

`docker stop` and grand-challenge end a job with SIGTERM. Python's default leaves SIGTERM to the kernel,
which kills the process outright (staged files stay behind) or, when the process is PID 1 of a container,
ignores it. With `install()` a signal raises `Interrupted` in the main thread, so the usual unwinding
removes staged outputs; inside `deferred()` (committing or removing staged outputs: milliseconds) it is
noted and raised when the block ends, so the output folder never holds one socket without the other.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGINT)

_depth = 0  # nesting of deferred() blocks, all threads together
_pending: int | None = None  # a signal that arrived inside one
_lock = threading.Lock()


def _handler(signum: int, frame) -> None:
    global _pending
    if _depth > 0:
        _pending = signum
        return
    raise Interrupted(signum)


def install() -> Callable[[], None]:
    """Handle SIGTERM and SIGINT as above; returns a function that restores the old handlers. Only the main
    thread may install handlers: elsewhere this does nothing (the host application owns its signals)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    for signum in HANDLED:
        signal.signal(signum, _handler)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back an Interrupted until the block ends (nothing changes where `install()` was not called)."""
    global _depth, _pending
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            signum = _pending if _depth == 0 else None
            if signum is not None:
                _pending = None
        if signum is not None:
            if threading.current_thread() is threading.main_thread():
                raise Interrupted(signum)
            signal.raise_signal(signum)  # handled again, now outside the block, in the main thread
