"""One read of an expert reader: where from, where to, its priority, its progress and its timing.

A request is created by `ExpertReader.submit`, waits in a priority queue, is started (handed to
the kernel or to a thread), may be continued after a short read, and ends by completing its
future with a `ReadResult` or an `IoReadError`.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from errno import ETIMEDOUT
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mer.errors import IoReadError, IoReadHungError, IoRequestError
from mer.compute.expert_format import PAGE_SIZE

Priority = Literal["foreground", "prefetch"]
PRIORITIES: tuple[Priority, ...] = ("foreground", "prefetch")


@dataclass(frozen=True)
class ReadResult:
    """A finished read.

    nbytes: bytes read (always the requested size).
    latency_us: from `submit()` to completion, queueing included.
    queue_wait_us: from `submit()` to the moment the read was handed to the kernel or a thread.
    num_continuations: reads issued again for the remainder after a short read.
    """

    nbytes: int
    latency_us: float
    queue_wait_us: float
    num_continuations: int = 0


@dataclass(eq=False)
class ReadRequest:
    """A read in progress: `nbytes_done` grows as (possibly short) reads complete."""

    file_index: int
    path: Path
    offset: int
    nbytes: int
    destination: memoryview
    priority: Priority
    future: asyncio.Future
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    started_ns: int = 0
    nbytes_done: int = 0
    num_continuations: int = 0
    deadline: asyncio.TimerHandle | None = None  # armed while the read is in flight (`read_deadline_s`)
    released: asyncio.Future | None = None  # set once the read is past its deadline: resolves when it ends

    @property
    def next_offset(self) -> int:
        """File offset of the part not read yet."""
        return self.offset + self.nbytes_done

    def remaining_destination(self) -> memoryview:
        """The part of the destination not filled yet."""
        return self.destination[self.nbytes_done :]

    def describe(self) -> str:
        """`<path>: <nbytes> bytes at offset <offset>` for error messages."""
        return f"{self.path}: read of {self.nbytes} bytes at offset {self.offset}"

    def result(self) -> ReadResult:
        """The `ReadResult` of a request that completed now."""
        now_ns = time.perf_counter_ns()
        return ReadResult(
            nbytes=self.nbytes_done,
            latency_us=(now_ns - self.submitted_ns) / 1000.0,
            queue_wait_us=(self.started_ns - self.submitted_ns) / 1000.0,
            num_continuations=self.num_continuations,
        )

    def os_error(self, errno: int, strerror: str) -> IoReadError:
        """The error of a read the operating system refused or failed."""
        message = f"{self.describe()} failed: [Errno {errno}] {strerror}"
        return IoReadError(message, str(self.path), self.offset, self.nbytes, errno)

    @property
    def is_hung(self) -> bool:
        """Whether the read went past its deadline (its future failed; the kernel may still write)."""
        return self.released is not None

    def hung_error(self, deadline_s: float, cancel: str) -> IoReadHungError:
        """The error of a read still in flight `deadline_s` after it was started."""
        seconds = (time.perf_counter_ns() - self.started_ns) / 1e9
        message = (f"{self.describe()} hung: no completion within {deadline_s:g} s (read_deadline_s): "
                   f"the device does not answer; cancel {cancel}")
        return IoReadHungError(message, str(self.path), self.offset, self.nbytes, ETIMEDOUT, seconds,
                               self.released, cancel)

    def short_read_error(self) -> IoReadError:
        """The error of a read that hit the end of the file after `nbytes_done` bytes."""
        end = self.next_offset
        message = f"{self.describe()} came back short: the file ends at byte {end} (got {self.nbytes_done} bytes)"
        return IoReadError(message, str(self.path), self.offset, self.nbytes)


def buffer_address(view: memoryview) -> int:
    """Address of the first byte of a writable buffer (to check alignment and placement)."""
    if view.readonly:
        raise IoRequestError("read destination is read-only: map the arena writable in the I/O worker")
    if not view.contiguous:
        raise IoRequestError("read destination must be a contiguous memoryview")
    if view.nbytes == 0:
        raise IoRequestError("read destination is empty")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def check_request(
    path: Path, offset: int, nbytes: int, destination: memoryview, priority: str, o_direct: bool
) -> memoryview:
    """Validate one request's arguments; return the destination as a flat byte memoryview."""
    if priority not in PRIORITIES:
        raise IoRequestError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    if offset < 0 or nbytes <= 0:
        raise IoRequestError(f"{path}: bad read of {nbytes} bytes at offset {offset}")
    view = memoryview(destination).cast("B")
    if view.nbytes != nbytes:
        raise IoRequestError(f"{path}: destination holds {view.nbytes} bytes, the read is {nbytes} bytes")
    address = buffer_address(view)
    if o_direct and (offset % PAGE_SIZE or nbytes % PAGE_SIZE or address % PAGE_SIZE):
        raise IoRequestError(
            f"{path}: O_DIRECT read of {nbytes} bytes at offset {offset} into address {address:#x}: "
            f"offset, size and destination must be multiples of {PAGE_SIZE}"
        )
    return view
