"""The read deadline of both expert readers: a read that hangs fails at `read_deadline_s`, the reads
behind it go on, and its destination is released only when the kernel has ended it.

A hung device cannot be made here: dm-delay and dm-flakey need device-mapper, which the test
machines do not have. The reads that hang are injected instead (`ExpertReader.inject_hangs`, the hook
behind `MER_READ_FAULTS=hang:ID`): counted in flight but never handed to the kernel or a thread, so
they never complete and cannot be cancelled, as a read stuck in a device that does not answer. The
io_uring cancel itself is exercised on a real read that blocks in the kernel: a read from a FIFO no
one writes to.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from mer.errors import IoReadHungError, IoRequestError
from mer.io import open_reader
from mer.io.uring_reader import UringReader
from tests.integration.test_io_readers import (  # noqa: F401 (fixtures)
    BACKENDS, PAGE, arena, disk_dir, disk_file, file_bytes, open_fds, run_on_uvloop,
)
from tests.support.host import requires_io_uring

DEADLINE_S = 0.3
BOUND_S = 1.0  # the deadline's timer on a loaded 2-core machine: seen at most this late


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_hung_read_fails_at_its_deadline_and_the_reads_behind_it_go_on(kind, disk_file, file_bytes, arena):
    async def scenario():
        threads_before, fds_before = set(threading.enumerate()), open_fds()
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=1, read_deadline_s=DEADLINE_S)
        hung_offset = 8 * PAGE
        reader.inject_hangs({(0, hung_offset): (1, float("inf"))})
        arena[: 2 * PAGE] = b"\xab" * (2 * PAGE)
        with memoryview(arena) as view:
            started = time.monotonic()
            hung = reader.submit(0, hung_offset, PAGE, view[:PAGE])
            behind = reader.submit(0, 3 * PAGE, PAGE, view[PAGE : 2 * PAGE])  # queued behind it (depth 1)
        with pytest.raises(IoReadHungError) as caught:
            await hung
        seconds = time.monotonic() - started
        assert DEADLINE_S <= seconds < DEADLINE_S + BOUND_S
        error = caught.value
        assert (error.path, error.offset, error.nbytes) == (str(disk_file), hung_offset, PAGE)
        assert str(error).startswith(f"{disk_file}: read of {PAGE} bytes at offset {hung_offset} hung: no completion "
                                     f"within {DEADLINE_S:g} s (read_deadline_s): the device does not answer; cancel ")
        assert DEADLINE_S <= error.seconds < DEADLINE_S + BOUND_S
        assert (reader.num_in_flight, reader.num_hung) in ((1, 1), (2, 1))  # the hung one, maybe the one behind
        # queued for the hung read's whole deadline, yet not hung: a deadline counts from the read's start
        result = await behind  # and no longer held up by the hung read
        assert result.nbytes == PAGE and result.queue_wait_us >= DEADLINE_S * 1e6
        assert arena[PAGE : 2 * PAGE] == file_bytes[3 * PAGE : 4 * PAGE]
        assert not error.released.done()  # the kernel could still write the destination
        assert (reader.num_in_flight, reader.num_hung) == (1, 1)
        later = reader.submit(0, 5 * PAGE, PAGE, memoryview(arena)[PAGE : 2 * PAGE])  # and the next ones
        assert (await later).nbytes == PAGE
        assert arena[:PAGE] == b"\xab" * PAGE  # the hung read wrote nothing
        closing = time.monotonic()
        await reader.close()
        assert time.monotonic() - closing < BOUND_S  # a hung read is not waited for
        assert error.released.done() and reader.num_in_flight == 0  # the injected one ends with the reader
        assert open_fds() <= fds_before and set(threading.enumerate()) <= threads_before

    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_hung_read_that_ends_late_releases_its_destination_after_writing_it(kind, disk_file, file_bytes, arena):
    """The device answers after the deadline (an injected hang of 0.8 s): the read's data lands in its
    destination after its future failed, which is why that memory must not be handed out before
    `released` resolves; then it does, with True (the read ended with its data)."""

    async def scenario():
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=2, read_deadline_s=DEADLINE_S)
        reader.inject_hangs({(0, 4 * PAGE): (1, 0.8)})
        arena[:PAGE] = b"\xab" * PAGE
        with memoryview(arena) as view:
            future = reader.submit(0, 4 * PAGE, PAGE, view[:PAGE])
        with pytest.raises(IoReadHungError) as caught:
            await future
        released = caught.value.released
        assert not released.done() and arena[:PAGE] == b"\xab" * PAGE
        assert await asyncio.wait_for(released, 5.0) is True
        assert arena[:PAGE] == file_bytes[4 * PAGE : 5 * PAGE]  # written after the request had failed
        assert (reader.num_in_flight, reader.num_hung) == (0, 0)
        await reader.close()

    run_on_uvloop(scenario())


def test_read_deadline_must_be_positive(disk_file, arena):
    async def scenario():
        with pytest.raises(IoRequestError, match="read_deadline_s must be positive, not 0"):
            open_reader("preadv", [disk_file], memoryview(arena), queue_depth=1, read_deadline_s=0)

    run_on_uvloop(scenario())


@requires_io_uring
def test_io_uring_cancels_a_hung_read_and_then_releases_its_destination(tmp_path, arena):
    """A read of a FIFO that no one writes blocks in the kernel; at its deadline io_uring's async cancel
    ends it (-ECANCELED): `released` resolves, and data written to the FIFO afterwards lands nowhere."""
    fifo = tmp_path / "hung.fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a FIFO opened read-write: the reader's open does not block

    async def scenario():
        reader = UringReader([fifo], memoryview(arena), 2, o_direct=False, read_deadline_s=DEADLINE_S)
        reader._file_sizes[0] = 1 << 20  # a FIFO's size is 0; let the read be submitted
        arena[:PAGE] = b"\xab" * PAGE
        with memoryview(arena) as view:
            future = reader.submit(0, 0, PAGE, view[:PAGE])
        with pytest.raises(IoReadHungError) as caught:
            await future
        error = caught.value
        assert error.cancel == "requested (io_uring async cancel)" and str(error).endswith(
            "; cancel requested (io_uring async cancel)")
        assert await asyncio.wait_for(error.released, 5.0) is False  # ended by the cancel, not by data
        assert reader.num_hung == 0 and reader.num_in_flight == 0
        os.write(writer, b"\xcd" * PAGE)
        await asyncio.sleep(0.1)
        assert arena[:PAGE] == b"\xab" * PAGE  # nothing read into the released destination
        await reader.close()

    try:
        run_on_uvloop(scenario())
    finally:
        os.close(writer)
