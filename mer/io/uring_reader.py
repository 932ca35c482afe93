"""The io_uring expert reader: O_DIRECT `readv` straight into arena slots, completions on the event loop.

No thread waits for completions: an eventfd registered with the ring becomes readable when
completions are posted, the event loop's `add_reader` callback reaps them (`io_uring_cq_ready`,
`io_uring_peek_cqe`, `io_uring_cq_advance`) and maps each `user_data` back to its request.

Reads use `io_uring_prep_readv` with an `Iovec` over the destination's address (the `liburing`
package's `prep_read` takes only a `bytearray`, which is not 4096-aligned, so O_DIRECT would fail
with EINVAL; and its `Iovec` leaks what it is given: see `mer.io.iovec_cache`).

With `register_buffers`, the reader's whole buffer is registered with the ring in pieces of at
most 1 GiB (the kernel's limit per buffer, rounded down to a multiple of `registration_unit`, e.g.
the slot size, so that no slot straddles two pieces), and reads that lie inside one piece use
`io_uring_prep_readv_fixed`: no page pinning per read, about half the CPU time per byte (measured:
~11 vs ~28 ms per 495 MB cold, same MB/s).  Registration pins, and so allocates, the whole buffer
at once.

Every read is flagged IOSQE_ASYNC: the kernel issues it from its io-wq worker, so `io_uring_submit`
returns in microseconds.  Issued inline, a 128 MiB O_DIRECT read stalled the submitting event loop
for up to ~100 ms (pinning pages, building and queueing bios) with no gain in throughput.

A read that completes short is continued for its remainder; a read that ends at the end of the
file fails with `IoReadError`.

A read past its deadline (`mer.io.reader_base`) is cancelled with IORING_OP_ASYNC_CANCEL on its
`user_data`.  The kernel cancels what has not reached the device, and interrupts what waits
interruptibly; a read already issued to a device that does not answer goes on (the cancel
completes with -EALREADY).  Either way the read's own completion, when it comes (-ECANCELED, an
error, or late data), releases its destination; a hung read is never continued.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import liburing

from mer.errors import IoRequestError
from mer.config import READ_DEADLINE_S
from mer.compute.expert_format import PAGE_SIZE
from mer.io.iovec_cache import IovecCache, raw_view
from mer.io.read_request import ReadRequest, buffer_address
from mer.io.reader_base import ExpertReader, close_files
from mer.logging_setup import get_logger

MAX_FIXED_BUFFER_NBYTES = 1 << 30
CANCEL_USER_DATA = 0  # the user_data of async cancels; reads are numbered from 1
TRANSIENT_SUBMIT_ERRORS = (errno.EAGAIN, errno.EBUSY, errno.EINTR)

log = get_logger()


class FixedBuffers:
    """A buffer registered with a ring as consecutive pieces; finds the piece holding a read."""

    def __init__(self, ring: liburing.Ring, buffer: memoryview, registration_unit: int):
        view = memoryview(buffer).cast("B")
        self.base_address = buffer_address(view)
        self.total_nbytes = view.nbytes
        self.piece_nbytes = (MAX_FIXED_BUFFER_NBYTES // registration_unit) * registration_unit
        if self.piece_nbytes == 0:
            raise IoRequestError(f"registration_unit {registration_unit} exceeds the 1 GiB registered buffer limit")
        starts = range(0, view.nbytes, self.piece_nbytes)
        pieces = [raw_view(self.base_address + start, min(self.piece_nbytes, view.nbytes - start)) for start in starts]
        liburing.io_uring_register_buffers(ring, liburing.Iovec(pieces))

    def index_of(self, address: int, nbytes: int) -> int | None:
        """Index of the registered piece that holds `[address, address + nbytes)`, or None."""
        relative = address - self.base_address
        if relative < 0 or relative + nbytes > self.total_nbytes:
            return None
        first, last = relative // self.piece_nbytes, (relative + nbytes - 1) // self.piece_nbytes
        return first if first == last else None

    def release(self, ring: liburing.Ring) -> None:
        liburing.io_uring_unregister_buffers(ring)


class UringReader(ExpertReader):
    """Expert reads through one io_uring, up to `queue_depth` in flight."""

    name = "uring"

    def __init__(
        self,
        paths: list[Path],
        buffer: memoryview,
        queue_depth: int,
        *,
        o_direct: bool = True,
        register_buffers: bool = False,
        registration_unit: int = PAGE_SIZE,
        reason: str = "io_uring requested",
        read_deadline_s: float = READ_DEADLINE_S,
    ):
        super().__init__(paths, queue_depth, o_direct, reason, read_deadline_s)
        self._ring = liburing.Ring()
        self._cqe = liburing.Cqe()
        self._is_ring_open = False
        self._eventfd = -1
        self._fixed_buffers: FixedBuffers | None = None
        self._iovecs = IovecCache()
        self._in_kernel: dict[int, tuple[ReadRequest, memoryview]] = {}
        self._next_user_data = 1
        self.num_fixed_reads = 0
        try:
            self._open_ring(buffer, register_buffers, registration_unit)
        except BaseException:
            self._release()
            close_files(self._fds)
            raise

    @property
    def uses_fixed_buffers(self) -> bool:
        return self._fixed_buffers is not None

    def _open_ring(self, buffer: memoryview, register_buffers: bool, registration_unit: int) -> None:
        liburing.io_uring_queue_init(self.queue_depth, self._ring)
        self._is_ring_open = True
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        liburing.io_uring_register_eventfd(self._ring, self._eventfd)
        if register_buffers:
            try:
                self._fixed_buffers = FixedBuffers(self._ring, buffer, registration_unit)
            except OSError as error:  # e.g. ENOMEM: RLIMIT_MEMLOCK too small to pin the arena
                self.reason += f"; buffers not registered: [Errno {error.errno}] {error.strerror}"
                log.warning("io_register_buffers_failed", errno=error.errno, message=error.strerror)
        self._loop.add_reader(self._eventfd, self._reap)

    def _start(self, request: ReadRequest) -> None:
        sqe = liburing.io_uring_get_sqe(self._ring)
        if sqe is None:
            raise OSError(errno.EBUSY, "io_uring submission queue is full")
        destination = request.remaining_destination()
        address = buffer_address(destination)
        iovec = self._iovecs.get(address, destination.nbytes)
        fd = self._fds[request.file_index]
        piece = None
        if self._fixed_buffers is not None:
            piece = self._fixed_buffers.index_of(address, destination.nbytes)
        if piece is None:
            liburing.io_uring_prep_readv(sqe, fd, iovec, request.next_offset)
        else:
            liburing.io_uring_prep_readv_fixed(sqe, fd, iovec, piece, request.next_offset)
            self.num_fixed_reads += 1
        liburing.io_uring_sqe_set_flags(sqe, liburing.IOSQE_ASYNC)
        user_data = self._next_user_data
        self._next_user_data += 1
        liburing.io_uring_sqe_set_data64(sqe, user_data)
        self._in_kernel[user_data] = (request, destination)

    def _flush(self) -> None:
        try:
            liburing.io_uring_submit(self._ring)
        except OSError as error:
            if error.errno not in TRANSIENT_SUBMIT_ERRORS:
                raise
            self._loop.call_soon(self._flush)

    def _reap(self) -> None:
        """Event-loop callback: take every posted completion off the ring."""
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass
        num_continued = 0
        while liburing.io_uring_cq_ready(self._ring):
            liburing.io_uring_peek_cqe(self._ring, self._cqe)
            entry = self._cqe[0]
            user_data = entry.user_data
            try:
                result = entry.res
            except OSError as error:
                result = -(error.errno or errno.EIO)
            liburing.io_uring_cq_advance(self._ring, 1)
            num_continued += self._on_completion(user_data, result)
        if num_continued:
            self._flush()

    def _cancel_started(self, request: ReadRequest) -> str:
        """Ask the kernel to cancel the hung read (its completion, whenever it comes, releases it)."""
        user_data = next((key for key, (started, _) in self._in_kernel.items() if started is request), None)
        if user_data is None:
            return "not needed (the read is not in the kernel)"
        sqe = liburing.io_uring_get_sqe(self._ring)
        if sqe is None:
            return "not tried (the submission queue is full)"
        liburing.io_uring_prep_cancel64(sqe, user_data, 0)
        liburing.io_uring_sqe_set_data64(sqe, CANCEL_USER_DATA)
        self._flush()
        return "requested (io_uring async cancel)"

    def _on_completion(self, user_data: int, result: int) -> int:
        """Account one completion; return 1 if the read was continued after a short read."""
        if user_data == CANCEL_USER_DATA:
            outcome = "cancelled" if result == 0 else os.strerror(-result) if result < 0 else str(result)
            log.info("hung_read_cancel", backend=self.name, result=result, outcome=outcome)
            return 0
        entry = self._in_kernel.pop(user_data, None)
        if entry is None:
            return 0
        request = entry[0]
        if request.is_hung:  # ended at last (cancelled, failed or late): nothing more is read into it
            self._finish(request, request.os_error(-result, os.strerror(-result)) if result < 0 else None)
            return 0
        if result < 0:
            self._finish(request, request.os_error(-result, os.strerror(-result)))
            return 0
        request.nbytes_done += result
        if request.nbytes_done == request.nbytes:
            self._finish(request)
            return 0
        if result == 0 or (self.o_direct and request.nbytes_done % PAGE_SIZE):
            self._finish(request, request.short_read_error())
            return 0
        request.num_continuations += 1
        try:
            self._start(request)
        except OSError as error:
            self._finish(request, request.os_error(error.errno or errno.EIO, error.strerror or str(error)))
            return 0
        return 1

    def _release(self) -> None:
        if self._eventfd >= 0 and not self._loop.is_closed():
            self._loop.remove_reader(self._eventfd)
        if self._is_ring_open:
            # Unregistering buffers waits for the reads using them: with hung reads, left to the ring's teardown.
            if self._fixed_buffers is not None and not self.num_hung:
                self._fixed_buffers.release(self._ring)
            self._fixed_buffers = None
            liburing.io_uring_queue_exit(self._ring)
            self._is_ring_open = False
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1
        self._in_kernel.clear()
        self._iovecs.clear()
