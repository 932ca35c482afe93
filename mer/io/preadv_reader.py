"""The fallback expert reader: `os.preadv` in a small thread pool, bridged into asyncio futures.

Used where io_uring is unavailable (old kernel, seccomp sandbox) or where the files are in memory
or refuse O_DIRECT (tmpfs, ramfs): then the reads are buffered.  The pool has `queue_depth` threads and the
shared queue never hands it more than `queue_depth` reads, so the priority order is kept by the
queue, not by the pool.

A pool thread blocked in a read that hangs cannot be interrupted: the read is failed at its deadline
(`mer.io.reader_base`) and no longer counts against `queue_depth`, and the pool has
`SPARE_THREADS` threads more than `queue_depth` so the reads behind it still get a thread (more hung
reads than that and they wait for one, past their own deadlines).  `close()` does not wait for a hung
thread; a thread stuck in the kernel keeps the process from exiting until the device answers.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from mer.compute.expert_format import PAGE_SIZE
from mer.config import READ_DEADLINE_S
from mer.io.read_request import ReadRequest
from mer.io.reader_base import ExpertReader

SPARE_THREADS = 16  # threads for reads started while others hang in the kernel (created only when needed)


def read_fully(fd: int, destination: memoryview, offset: int, o_direct: bool) -> tuple[int, int, tuple | None]:
    """Fill `destination` from `offset` of `fd`, continuing after short reads (runs in a pool thread).

    Returns (bytes read, continuations, (errno, strerror) of a failure or None); fewer bytes than
    asked and no failure means the end of the file.  Under O_DIRECT only the end of the file can
    cut a read off a page boundary.  Nothing raised here may keep `destination` alive (in a
    traceback), or the caller's mmap could not be closed.
    """
    nbytes_done = 0
    num_continuations = -1
    while nbytes_done < destination.nbytes:
        num_continuations += 1
        try:
            count = os.preadv(fd, [destination[nbytes_done:]], offset + nbytes_done)
        except OSError as error:
            return nbytes_done, num_continuations, (error.errno or 0, error.strerror or str(error))
        nbytes_done += count
        if count == 0 or (o_direct and nbytes_done < destination.nbytes and nbytes_done % PAGE_SIZE):
            break
    return nbytes_done, max(num_continuations, 0), None


class PreadvReader(ExpertReader):
    """Expert reads by `queue_depth` threads calling `os.preadv`."""

    name = "preadv"

    def __init__(self, paths: list[Path], queue_depth: int, *, o_direct: bool, reason: str = "preadv requested",
                 read_deadline_s: float = READ_DEADLINE_S):
        super().__init__(paths, queue_depth, o_direct, reason, read_deadline_s)
        self._executor = ThreadPoolExecutor(max_workers=queue_depth + SPARE_THREADS, thread_name_prefix="mer-preadv")

    def _start(self, request: ReadRequest) -> None:
        fd = self._fds[request.file_index]
        work = self._executor.submit(read_fully, fd, request.destination, request.offset, self.o_direct)
        work.add_done_callback(partial(self._on_thread_done, request))

    def _on_thread_done(self, request: ReadRequest, work: Future) -> None:
        """Runs in the pool thread: move the completion onto the event loop."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_completion, request, work)

    def _on_completion(self, request: ReadRequest, work: Future) -> None:
        try:
            request.nbytes_done, request.num_continuations, failure = work.result()
        except Exception as error:  # a bug in read_fully: fail this read, not the event loop
            self._finish(request, error)
            return
        if failure is not None:
            self._finish(request, request.os_error(*failure))
        elif request.nbytes_done < request.nbytes:
            self._finish(request, request.short_read_error())
        else:
            self._finish(request)

    def _cancel_started(self, request: ReadRequest) -> str:
        return "impossible (a preadv thread cannot be interrupted)"

    def _release(self) -> None:
        self._executor.shutdown(wait=self.num_hung == 0, cancel_futures=True)
