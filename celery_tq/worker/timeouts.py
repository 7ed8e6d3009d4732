"""Timeouts on every pool: Celery enforces time limits only on prefork, so the rest is ours.

- prefork: Celery's own soft/hard limits (the publisher sets the ``timelimit`` header).
- solo, or any task running in a process's main thread: ``SIGALRM`` raises in the task.
- threads (and the in-process worker): a timer raises in the task's thread; if the task is
  stuck in C code past the hard limit, the run is failed with ``TaskTimeout`` at once and its
  late result is discarded.
- eventlet/gevent: refused with ``ConfigurationError`` (they cannot preempt a task).
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from celery.exceptions import SoftTimeLimitExceeded

from celery_tq.errors import ConfigurationError

__all__ = ["RunClock", "enforce", "set_pool"]

_pool: str | None = None
_ENFORCING_POOLS = {"prefork", "solo", "thread", "threads", None}


def set_pool(name: str | None) -> None:
    """Record which pool this worker process runs (from the ``worker_init`` signal)."""
    global _pool
    _pool = name


def current_pool() -> str | None:
    return _pool


class _SoftTimeout(SoftTimeLimitExceeded):
    """Raised inside a task's thread or main thread by our own timer."""


@dataclass
class RunClock:
    """What the enforcement did to one run."""

    hard_expired: bool = False


@contextmanager
def enforce(timeout: float | None, grace: float, on_hard: Callable[[], None]) -> Iterator[RunClock]:
    """Run the block under ``timeout`` seconds; ``on_hard`` fails the run past timeout + grace."""
    clock = RunClock()
    pool = current_pool()
    if timeout is None or pool == "prefork":
        yield clock
        return
    if pool not in _ENFORCING_POOLS:
        raise ConfigurationError(
            f"the {pool} pool cannot enforce timeout={timeout:g}s; "
            "run timed tasks on prefork, threads or solo"
        )
    with _hard_timer(timeout + grace, clock, on_hard) as finished:
        if threading.current_thread() is threading.main_thread():
            with _alarm(timeout):
                yield clock
        else:
            with _thread_timer(timeout, finished):
                yield clock


@contextmanager
def _hard_timer(deadline: float, clock: RunClock, on_hard: Callable[[], None]) -> Iterator[threading.Event]:
    """Past the hard deadline the run is failed at once; its late result is then discarded."""
    finished = threading.Event()
    guard = threading.Lock()

    def hard() -> None:
        with guard:
            if finished.is_set():
                return
            clock.hard_expired = True
        on_hard()

    timer = threading.Timer(deadline, hard)
    timer.daemon = True
    timer.start()
    try:
        yield finished
    finally:
        with guard:
            finished.set()
        timer.cancel()


@contextmanager
def _alarm(timeout: float) -> Iterator[None]:
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise _SoftTimeout()

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _thread_timer(timeout: float, finished: threading.Event) -> Iterator[None]:
    target = threading.get_ident()
    guard = threading.Lock()
    done = False

    def soft() -> None:
        with guard:
            if not done and not finished.is_set():
                # Delivered at the thread's next bytecode; blocking C calls delay it.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(target), ctypes.py_object(_SoftTimeout)
                )

    timer = threading.Timer(timeout, soft)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with guard:
            done = True
        timer.cancel()
