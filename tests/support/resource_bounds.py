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


def fuzz_test(max_examples: int):
    """A hypothesis fuzz test taking `data` (st.data()), fit for two busy cores: marked slow, no deadline, a
    bounded number of examples, the same examples every run, function-scoped fixtures allowed (each
    example rewrites its files)."""
    import pytest
    from hypothesis import HealthCheck, given, settings, strategies

    fuzz_settings = settings(max_examples=max_examples, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

    def decorate(test):
        return pytest.mark.slow(fuzz_settings(given(data=strategies.data())(test)))

    return decorate


def check_fuzz_case(kind: str, action: Callable[[], str], memory_limit: int) -> str:
    """Run one fuzz case's `action` (returning how it ended: 'ok' or an error's name) within 60 s, record
    `kind: outcome` (pytest --hypothesis-show-statistics shows how the cases ended), and fail if it
    allocated `memory_limit` bytes or more."""
    from hypothesis import event

    with bounded() as peak:
        outcome = action()
    event(f"{kind}: {outcome}")
    assert peak() < memory_limit, f"{kind}: {peak()} bytes allocated ({outcome})"
    return outcome
