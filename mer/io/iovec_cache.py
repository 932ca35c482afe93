"""`liburing.Iovec`s that do not pin the arena's mmap, one per destination.

The `liburing` package (2026.3.30) keeps a reference and a buffer export on every memoryview
passed to `Iovec([...])` and never gives them back.  An Iovec built over a slice of the arena's
mmap would therefore leak a little memory per read and make the mmap impossible to close
("BufferError: cannot close exported pointers exist").

So Iovecs are built over a raw view of the same address (a `ctypes` array made from the address,
which exports nothing of the mmap), and cached per (address, size): what leaks is bounded by the
number of distinct destinations (the arena's slots), and the mmap can be closed.  A raw view does
not keep the memory mapped: the caller keeps the real destination alive while a read is in flight.
"""

from __future__ import annotations

import ctypes

import liburing


def raw_view(address: int, nbytes: int) -> memoryview:
    """A writable byte view of `nbytes` at `address` that holds no reference to the owner."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class IovecCache:
    """One single-buffer `liburing.Iovec` per (address, size), built on first use."""

    def __init__(self) -> None:
        self._iovecs: dict[tuple[int, int], liburing.Iovec] = {}

    def __len__(self) -> int:
        return len(self._iovecs)

    def get(self, address: int, nbytes: int) -> liburing.Iovec:
        key = (address, nbytes)
        iovec = self._iovecs.get(key)
        if iovec is None:
            iovec = liburing.Iovec([raw_view(address, nbytes)])
            self._iovecs[key] = iovec
        return iovec

    def clear(self) -> None:
        self._iovecs.clear()
