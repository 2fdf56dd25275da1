"""How a stopped command stops: SIGTERM (a job scheduler, `kill`, torchrun ending its other ranks) raises in the
main thread as Ctrl-C does, so every `finally` and cleanup runs (temporary stores, half-made run folders, lock
files) and the command reports it; and, around bookkeeping another library must finish (optuna's storage
writes), a stop is held until the next safe point.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: a KeyboardInterrupt, so code that cleans up after Ctrl-C cleans up after it too."""


TERMINATED = threading.Event()  # set by SIGTERM, so a raise that code swallowed is raised again at `check_stop`


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 (signal handler signature)
    TERMINATED.set()
    raise Terminated()


def check_stop() -> None:
    """Raise the SIGTERM again if it was swallowed: a signal's exception may land in code that ignores exceptions
    (Python's at-fork hooks when a DataLoader starts its workers, finalizers). Long loops call this per batch."""
    if TERMINATED.is_set():
        raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated` in the main thread (elsewhere signals cannot be handled: no change);
    one whose exception was swallowed is raised when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
        check_stop()
    finally:
        signal.signal(signal.SIGTERM, previous)


class HeldStop:
    """Ctrl-C and SIGTERM noted instead of raised; `check()` raises the noted stop at a safe point. A second
    signal raises at once (the user insists)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def note(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signum is not None:
            self.raise_noted()
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            self.raise_noted()

    def raise_noted(self) -> None:
        raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def held_stops() -> Iterator[HeldStop]:
    """Within: stops are held (see HeldStop) and raised at `check()`, or on leaving the block if none came."""
    stop = HeldStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    stop.check()
