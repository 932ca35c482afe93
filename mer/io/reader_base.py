"""What every expert read backend shares: files, a two-level priority queue, and the life cycle.

A backend (`UringReader`, `PreadvReader`) only says how to start a read (`_start`), how to hand
started reads over in a batch (`_flush`), and how to free its kernel resources (`_release`).

Life of a request::

    submit() --> QUEUED (foreground queue, or prefetch queue)
    QUEUED --pump: fewer than queue_depth in flight--> IN FLIGHT (kernel or thread)
    QUEUED --cancel(future)--> future cancelled (nothing was read)
    QUEUED --promote(future)--> moved to the foreground queue
    IN FLIGHT --short read--> IN FLIGHT (the remainder is read)
    IN FLIGHT --done--> future result ReadResult, or exception IoReadError
    IN FLIGHT --read_deadline_s passes--> HUNG: future exception IoReadHungError; a cancel is tried
    HUNG --the kernel ends the read (late completion, or cancelled)--> error.released resolves
    QUEUED --pump, an injected fault pending for its (file, offset)--> exception IoReadError (EIO)
    QUEUED --pump, an injected hang pending for its (file, offset)--> IN FLIGHT, never handed over

The pump always takes foreground requests before prefetch requests, each queue in FIFO order.
An in-flight read cannot be called back: its destination is written until it completes, even if
its future was cancelled; `close()` waits for it.  All methods must be called from the thread of
the running event loop the reader was opened in.

Deadlines: every read handed over is given `read_deadline_s` (from then, not from `submit`: the
time a read waits in the queue is the deadline of the reads ahead of it).  A read still in flight
then is HUNG: its future fails with `IoReadHungError` (file, offset, size, seconds), the backend
tries to cancel it (`_cancel_started`: io_uring's async cancel; a preadv thread cannot be
cancelled), and it no longer counts against `queue_depth`, so the reads behind it go on.  Its
destination may still be written by the kernel until the read really ends; the error's `released`
future resolves then (never, if the device never answers), and the caller must not hand that memory
to anyone else before (`mer.io.slot_reads` quarantines the slot).  `close()` does not wait for hung reads.

`inject_faults({(file_index, offset): count})` makes the next `count` reads at that place fail with
EIO where a read would be started, exactly as the kernel's failure of that read would end it (the
test hook behind `MER_READ_FAULTS`; see `mer.environment`).  `inject_hangs({...: (count, seconds)})`
makes them hang instead: the read counts as in flight but is handed to the kernel or a thread only
`seconds` after it was started (never, with inf), and its cancel fails, as a read stuck in a device
that does not answer (or answers late) would (dm-delay or dm-flakey would make a real one; the test
machines have no device-mapper).  `close()` ends those not handed over (nothing was written).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path

from mer.config import READ_DEADLINE_S
from mer.errors import IoRequestError, StoreError
from mer.io.read_request import PRIORITIES, Priority, ReadRequest, ReadResult, check_request
from mer.logging_setup import get_logger

log = get_logger()


def open_files(paths: list[Path], o_direct: bool) -> list[int]:
    """Open every file read-only (O_DIRECT when asked); close the ones opened if one fails."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if o_direct else 0)
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, flags))
    except OSError as error:
        close_files(fds)
        mode = " with O_DIRECT" if o_direct else ""
        message = f"{error.filename}: cannot open for reading{mode}: [Errno {error.errno}] {error.strerror}"
        raise StoreError(message) from None
    except BaseException:
        close_files(fds)
        raise
    return fds


def close_files(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


class ExpertReader(ABC):
    """Reads byte ranges of expert files into caller-owned memory, several at a time."""

    name: str = ""

    def __init__(self, paths: list[Path], queue_depth: int, o_direct: bool, reason: str,
                 read_deadline_s: float = READ_DEADLINE_S):
        if queue_depth < 1:
            raise IoRequestError(f"queue_depth must be at least 1, not {queue_depth}")
        if not read_deadline_s > 0:
            raise IoRequestError(f"read_deadline_s must be positive, not {read_deadline_s}")
        if not paths:
            raise IoRequestError("an expert reader needs at least one file")
        self.paths = [Path(path) for path in paths]
        self.queue_depth = queue_depth
        self.o_direct = o_direct
        self.reason = reason
        self.read_deadline_s = read_deadline_s
        self._loop = asyncio.get_running_loop()
        self._queues: dict[Priority, deque[ReadRequest]] = {priority: deque() for priority in PRIORITIES}
        self._queued: dict[asyncio.Future, ReadRequest] = {}
        self._num_in_flight = 0
        self._num_hung = 0  # of the reads in flight, those past their deadline
        self._idle = asyncio.Event()
        self._idle.set()
        self._is_pump_scheduled = False
        self._is_closed = False
        self._faults: dict[tuple[int, int], int] = {}  # (file index, offset) -> reads left to fail
        self._hangs: dict[tuple[int, int], int] = {}  # (file index, offset) -> reads left to hang
        self._hang_seconds: dict[tuple[int, int], float] = {}  # (file index, offset) -> how long they hang
        self._withheld: set[ReadRequest] = set()  # injected hangs: in flight, never handed over
        self._fds = open_files(self.paths, o_direct)
        self._file_sizes = [os.fstat(fd).st_size for fd in self._fds]

    @property
    def num_in_flight(self) -> int:
        """Reads handed to the kernel or a thread and not completed yet."""
        return self._num_in_flight

    @property
    def num_hung(self) -> int:
        """Reads in flight past their deadline (their futures failed; the kernel has not ended them)."""
        return self._num_hung

    @property
    def num_queued(self) -> int:
        """Reads waiting for a free place in the queue depth."""
        return len(self._queued)

    def submit(
        self,
        file_index: int,
        offset: int,
        nbytes: int,
        destination: memoryview,
        priority: Priority = "foreground",
    ) -> asyncio.Future[ReadResult]:
        """Queue a read of `nbytes` at `offset` of file `file_index` into `destination`.

        Returns a future of `ReadResult`, or of `IoReadError` (failure, short read, past the end).
        Malformed requests raise `IoRequestError` at once.
        """
        if self._is_closed:
            raise IoRequestError(f"{self.name} reader is closed")
        if not 0 <= file_index < len(self.paths):
            raise IoRequestError(f"file index {file_index} out of range: the reader has {len(self.paths)} files")
        path = self.paths[file_index]
        view = check_request(path, offset, nbytes, destination, priority, self.o_direct)
        future: asyncio.Future[ReadResult] = self._loop.create_future()
        request = ReadRequest(file_index, path, offset, nbytes, view, priority, future)
        if offset + nbytes > self._file_sizes[file_index]:
            request.nbytes_done = max(0, self._file_sizes[file_index] - offset)
            future.set_exception(request.short_read_error())
            return future
        self._queues[priority].append(request)
        self._queued[future] = request
        self._schedule_pump()
        return future

    def cancel(self, future: asyncio.Future) -> bool:
        """Cancel a read that has not started; False if it is in flight or done."""
        request = self._queued.pop(future, None)
        if request is None:
            return False
        self._queues[request.priority].remove(request)
        future.cancel()
        return True

    def promote(self, future: asyncio.Future) -> bool:
        """Move a queued prefetch read to the end of the foreground queue; False if not queued."""
        request = self._queued.get(future)
        if request is None or request.priority == "foreground":
            return False
        self._queues["prefetch"].remove(request)
        request.priority = "foreground"
        self._queues["foreground"].append(request)
        return True

    def inject_faults(self, faults: dict[tuple[int, int], int]) -> None:
        """Fail the next `count` reads at each `(file_index, offset)` with EIO (see the module docstring)."""
        self._faults.update(faults)

    def inject_hangs(self, hangs: dict[tuple[int, int], tuple[int, float]]) -> None:
        """Make the next `count` reads at each `(file_index, offset)` hang for `seconds` (inf: for ever; see
        the module docstring)."""
        for place, (count, seconds) in hangs.items():
            self._hangs[place] = count
            self._hang_seconds[place] = seconds

    @staticmethod
    def _take(injected: dict[tuple[int, int], int], request: ReadRequest) -> bool:
        key = (request.file_index, request.offset)
        if injected.get(key, 0) <= 0:
            return False
        injected[key] -= 1
        return True

    async def close(self, timeout_s: float = 30.0) -> None:
        """Cancel queued reads, wait up to `timeout_s` for in-flight ones, free every resource.

        Hung reads (past their deadline) are not waited for, nor are reads still in flight after the
        timeout: they are logged and abandoned, and the kernel may still write their destinations.
        """
        if self._is_closed:
            return
        self._is_closed = True
        for future in list(self._queued):
            self.cancel(future)
        for request in list(self._withheld):  # injected hangs: never handed over, nothing written
            self._withheld.discard(request)
            self._finish(request, IoRequestError(f"{self.name} reader closed"))
        if self._num_hung:
            log.warning("io_reader_closed_with_hung_reads", backend=self.name, hung=self._num_hung)
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see Supervisor._next_event
                await self._idle.wait()
        except TimeoutError:
            log.warning("io_reader_close_timeout", backend=self.name, in_flight=self._num_in_flight)
        self._release()
        close_files(self._fds)

    @abstractmethod
    def _start(self, request: ReadRequest) -> None:
        """Hand the unread part of `request` to the kernel or a thread (may be batched)."""

    def _flush(self) -> None:
        """Hand over what `_start` batched (io_uring: one submit for many reads)."""

    @abstractmethod
    def _release(self) -> None:
        """Free the backend's kernel resources; no read is in flight but hung ones."""

    def _cancel_started(self, request: ReadRequest) -> str:
        """Try to cancel a hung read the backend has started; say what was done (for the error)."""
        return "not supported by this backend"

    def _schedule_pump(self) -> None:
        if not self._is_pump_scheduled:
            self._is_pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Start queued reads, foreground first, while fewer than queue_depth are in flight (hung ones aside)."""
        self._is_pump_scheduled = False
        num_started = 0
        while self._num_in_flight - self._num_hung < self.queue_depth and self._queued:
            request = self._next_queued()
            self._queued.pop(request.future)
            if request.future.done():
                continue
            request.started_ns = time.perf_counter_ns()
            self._num_in_flight += 1
            self._idle.clear()
            request.deadline = self._loop.call_later(self.read_deadline_s, self._on_deadline, request)
            if self._hangs and self._take(self._hangs, request):
                self._withhold(request)
                continue
            try:
                if self._faults and self._take(self._faults, request):
                    raise OSError(errno.EIO, "Input/output error (injected: MER_READ_FAULTS)")
                self._start(request)
            except OSError as error:
                self._finish(request, request.os_error(error.errno or 0, error.strerror or str(error)))
                continue
            num_started += 1
        if num_started:
            self._flush()

    def _next_queued(self) -> ReadRequest:
        foreground = self._queues["foreground"]
        return foreground.popleft() if foreground else self._queues["prefetch"].popleft()

    def _withhold(self, request: ReadRequest) -> None:
        """An injected hang: in flight, handed over only after its seconds (never, if inf)."""
        self._withheld.add(request)
        seconds = self._hang_seconds[(request.file_index, request.offset)]
        if seconds != float("inf"):
            self._loop.call_later(seconds, self._hand_over, request)

    def _hand_over(self, request: ReadRequest) -> None:
        """The device of an injected hang answers at last: the read is started (after its deadline: as hung)."""
        if request not in self._withheld:  # the reader closed meanwhile
            return
        self._withheld.discard(request)
        try:
            self._start(request)
            self._flush()
        except OSError as error:
            self._finish(request, request.os_error(error.errno or 0, error.strerror or str(error)))

    def _on_deadline(self, request: ReadRequest) -> None:
        """The read is still in flight `read_deadline_s` after it was started: it hangs (module docstring)."""
        request.deadline = None
        request.released = self._loop.create_future()
        self._num_hung += 1
        self._update_idle()
        if request in self._withheld:
            cancel = "ignored (an injected hang: MER_READ_FAULTS)"
        else:
            cancel = self._cancel_started(request)
        if not request.future.done():
            request.future.set_exception(request.hung_error(self.read_deadline_s, cancel))
        if self._queued:
            self._schedule_pump()

    def _update_idle(self) -> None:
        """`_idle` is set while no read is in flight but hung ones."""
        if self._num_in_flight == self._num_hung:
            self._idle.set()

    def _finish(self, request: ReadRequest, error: BaseException | None = None) -> None:
        """End an in-flight request with its result or `error`, and start the next queued ones."""
        self._num_in_flight -= 1
        if request.deadline is not None:
            request.deadline.cancel()
            request.deadline = None
        if request.is_hung:  # the kernel has let go of the destination at last
            self._num_hung -= 1
            request.released.set_result(error is None)
        self._update_idle()
        if not request.future.done():
            if error is None:
                request.future.set_result(request.result())
            else:
                request.future.set_exception(error)
        if self._queued:
            self._schedule_pump()
