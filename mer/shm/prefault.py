"""Backing the slot arena's pages with memory in the background, while the I/O worker serves.

First touch of fresh shared memory costs ~60-70 ms per 100 MB on this machine (the kernel zeroes
each page), so a 10 GiB arena took ~7 s to prefault before the I/O worker could say READY: most
of the gap between mer's start-up and llama.cpp's load beyond RAM. `BackgroundPrefault` does the
same `madvise(MADV_POPULATE_WRITE)` from a daemon thread, slot by slot from slot 0 (the slot table
hands out low slots first), in chunks, through ctypes, which releases the GIL for the call: the
I/O worker's event loop keeps serving, the router loads its dense weights meanwhile, and a read
into a slot the thread has not reached yet simply faults its own pages. Populating never changes
a page that is already there, so a read landing in a chunk being populated is safe.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
import time
from collections.abc import Callable

MADV_POPULATE_WRITE = 23  # linux/mman.h; Linux 5.14+
CHUNK_NBYTES = 64 << 20  # one madvise call: ~40 ms here, so stop() returns quickly

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


class PrefaultUnsupported(OSError):
    """The kernel has no MADV_POPULATE_WRITE (before Linux 5.14): prefault by touching instead."""


def populate(address: int, nbytes: int) -> None:
    """madvise(MADV_POPULATE_WRITE) on `[address, address + nbytes)`, without holding the GIL."""
    if _libc.madvise(address, nbytes, MADV_POPULATE_WRITE) != 0:
        code = ctypes.get_errno()
        if code == errno.EINVAL:
            raise PrefaultUnsupported(code, "madvise(MADV_POPULATE_WRITE) is not supported by this kernel")
        raise OSError(code, f"madvise(MADV_POPULATE_WRITE): {os.strerror(code)}")


class BackgroundPrefault:
    """Populates `[address, address + nbytes)` in chunks from a daemon thread; `on_done(seconds, error)`
    is called from that thread when it ends (error None when every page is backed, or when stopped)."""

    def __init__(self, address: int, nbytes: int, on_done: Callable[[float, BaseException | None], None]):
        self.address, self.nbytes, self.on_done = address, nbytes, on_done
        self.populated = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arena-prefault", daemon=True)

    def start(self) -> "BackgroundPrefault":
        """Populate the first chunk here (so an unsupported kernel raises `PrefaultUnsupported` now),
        then the rest in the background."""
        first = min(CHUNK_NBYTES, self.nbytes)
        self._started = time.perf_counter()
        populate(self.address, first)
        self.populated = first
        self._thread.start()
        return self

    def _run(self) -> None:
        error = None
        try:
            while self.populated < self.nbytes and not self._stop.is_set():
                chunk = min(CHUNK_NBYTES, self.nbytes - self.populated)
                populate(self.address + self.populated, chunk)
                self.populated += chunk
        except OSError as failure:
            error = failure
        self.on_done(time.perf_counter() - self._started, error)

    @property
    def is_done(self) -> bool:
        return not self._thread.is_alive() and self.populated >= self.nbytes

    def stop(self) -> None:
        """Stop after the chunk in progress and wait for the thread (before the arena is unmapped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
