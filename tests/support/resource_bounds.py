"""Bounds on a piece of code under test: a time limit (SIGALRM) and its Python/numpy allocations
(tracemalloc: numpy registers its buffers with it; memory maps are not counted)."""

from __future__ import annotations

import signal
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Hang(Exception):
    """The code ran past its time limit."""


@contextmanager
def bounded(limit_s: int = 60) -> Iterator[Callable[[], int]]:
    """Raise Hang in the block after `limit_s` seconds; yield a function giving the peak of the bytes
    allocated so far (tracemalloc)."""
    def interrupt(signum, frame):
        raise Hang(f"still running after {limit_s} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(limit_s)
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
