"""The expert read backends (io_uring and preadv) against real files on disk and on tmpfs.

O_DIRECT needs a real filesystem: the disk files live under tmp_path when it is not tmpfs, else
under /work/tmp-io-tests.  The tmpfs files live in /dev/shm.  Every test runs its coroutine on
uvloop (the I/O worker's loop) unless it says otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import uvloop

import mer.io.backend as backend
import mer.io.uring_reader as uring_reader
from mer.errors import IoBackendUnavailableError, IoReadError, IoRequestError, StoreError
from mer.io import open_reader
from mer.io.preadv_reader import PreadvReader
from mer.io.uring_reader import UringReader
from tests.support.host import URING_PROBLEM, requires_io_uring

PAGE = 4096
FILE_NBYTES = 6 * 1024 * 1024
ARENA_NBYTES = 4 * 1024 * 1024
SEED = 20261129
BACKENDS = [pytest.param("uring", marks=requires_io_uring), "preadv"]


def filesystem_type(path: Path) -> str:
    command = ["stat", "-f", "-c", "%T", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a filesystem that supports O_DIRECT."""
    if filesystem_type(tmp_path) != "tmpfs":
        yield tmp_path
        return
    directory = Path("/work/tmp-io-tests") / uuid.uuid4().hex
    directory.mkdir(parents=True)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def file_bytes() -> bytes:
    print(f"seed {SEED}")
    return np.random.default_rng(SEED).integers(0, 256, FILE_NBYTES, dtype=np.uint8).tobytes()


@pytest.fixture
def disk_file(disk_dir, file_bytes) -> Path:
    path = disk_dir / "experts.bin"
    path.write_bytes(file_bytes)
    return path


@pytest.fixture
def tmpfs_file(file_bytes):
    path = Path("/dev/shm") / f"mer-test-io-{uuid.uuid4().hex[:8]}.bin"
    path.write_bytes(file_bytes)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture
def arena(request):
    """Shared memory standing in for the slot arena (anonymous, or a /dev/shm file as the real one).

    Checks at the end that nothing still pins it.
    """
    if getattr(request, "param", "anonymous") == "anonymous":
        memory = mmap.mmap(-1, ARENA_NBYTES)
        yield memory
        memory.close()  # raises BufferError if a reader leaked a view of it
        return
    path = Path("/dev/shm") / f"mer-test-io-arena-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, ARENA_NBYTES)
        memory = mmap.mmap(fd, ARENA_NBYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        yield memory
        memory.close()
    finally:
        os.close(fd)
        path.unlink()


def open_fds() -> set[str]:
    """This process's open descriptors as "fd -> what it is" (a file's path, anon_inode:[io_uring], ...).
    Compare with `<=`: another test's leftovers (e.g. an in-process Ray client's sockets) may close
    meanwhile, but a descriptor the code under test leaves open is a pair that was not there before."""
    described = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            described.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # closed between the listing and the readlink
            continue
    return described


def run_on_uvloop(coroutine):
    return uvloop.run(coroutine)


async def read_random_ranges(reader, arena, file_bytes, rng, num_reads, num_files=1):
    """Submit `num_reads` random page-aligned reads into disjoint arena ranges; check every byte."""
    view = memoryview(arena)
    reads = []
    cursor = 0
    for index in range(num_reads):
        nbytes = int(rng.integers(1, 17)) * PAGE
        if cursor + nbytes > ARENA_NBYTES:
            cursor = 0
            await asyncio.gather(*(future for *_, future in reads))
            check_reads(reads, view, file_bytes)
            reads.clear()
        offset = int(rng.integers(0, (FILE_NBYTES - nbytes) // PAGE + 1)) * PAGE
        priority = "prefetch" if index % 3 == 0 else "foreground"
        file_index = index % num_files
        future = reader.submit(file_index, offset, nbytes, view[cursor : cursor + nbytes], priority)
        reads.append((offset, nbytes, cursor, future))
        cursor += nbytes
    await asyncio.gather(*(future for *_, future in reads))
    check_reads(reads, view, file_bytes)
    view.release()


def check_reads(reads, view, file_bytes):
    for offset, nbytes, cursor, future in reads:
        result = future.result()
        assert result.nbytes == nbytes
        assert result.latency_us >= result.queue_wait_us >= 0
        assert bytes(view[cursor : cursor + nbytes]) == file_bytes[offset : offset + nbytes]


@pytest.mark.parametrize("arena", ["anonymous", "shm"], indirect=True)
@pytest.mark.parametrize("kind", BACKENDS)
def test_reads_exact_bytes_with_several_in_flight(kind, disk_file, file_bytes, arena):
    async def scenario():
        reader = open_reader(kind, [disk_file, disk_file], memoryview(arena), queue_depth=4)
        assert reader.name == kind and reader.o_direct
        await read_random_ranges(reader, arena, file_bytes, np.random.default_rng(SEED), 80, num_files=2)
        await reader.close()

    run_on_uvloop(scenario())


@requires_io_uring
def test_uring_reads_exact_bytes_on_the_default_asyncio_loop(disk_file, file_bytes, arena):
    async def scenario():
        reader = open_reader("uring", [disk_file], memoryview(arena), queue_depth=8)
        await read_random_ranges(reader, arena, file_bytes, np.random.default_rng(SEED + 1), 40)
        await reader.close()

    asyncio.run(scenario())


@requires_io_uring
@pytest.mark.parametrize("arena", ["shm"], indirect=True)
def test_uring_registered_buffers_serve_reads_inside_one_piece(disk_file, file_bytes, arena, monkeypatch):
    """Pieces of 256 KiB: reads inside a piece go readv_fixed, reads across pieces plain readv."""
    monkeypatch.setattr(uring_reader, "MAX_FIXED_BUFFER_NBYTES", 256 * 1024)

    async def scenario():
        reader = open_reader("uring", [disk_file], memoryview(arena), 4, register_buffers=True, registration_unit=PAGE)
        assert reader.uses_fixed_buffers
        view = memoryview(arena)
        inside = reader.submit(0, 40 * PAGE, 16 * PAGE, view[0 : 16 * PAGE])
        across = reader.submit(0, 8 * PAGE, 16 * PAGE, view[60 * PAGE : 76 * PAGE])
        await asyncio.gather(inside, across)
        assert reader.num_fixed_reads == 1
        assert bytes(view[0 : 16 * PAGE]) == file_bytes[40 * PAGE : 56 * PAGE]
        assert bytes(view[60 * PAGE : 76 * PAGE]) == file_bytes[8 * PAGE : 24 * PAGE]
        await read_random_ranges(reader, arena, file_bytes, np.random.default_rng(SEED + 2), 30)
        assert reader.num_fixed_reads > 1
        view.release()
        await reader.close()

    run_on_uvloop(scenario())


@requires_io_uring
def test_auto_selects_uring_with_o_direct_on_disk(disk_file, arena):
    async def scenario():
        reader = open_reader("auto", [disk_file], memoryview(arena), queue_depth=2)
        assert (reader.name, reader.o_direct) == ("uring", True)
        assert reader.reason == "io_uring and O_DIRECT available"
        await reader.close()

    run_on_uvloop(scenario())


def test_auto_falls_back_to_buffered_preadv_on_tmpfs(tmpfs_file, file_bytes, arena):
    assert filesystem_type(tmpfs_file) == "tmpfs"

    async def scenario():
        reader = open_reader("auto", [tmpfs_file], memoryview(arena), queue_depth=3)
        assert (reader.name, reader.o_direct) == ("preadv", False)
        uring = f"io_uring unavailable: {URING_PROBLEM}; " if URING_PROBLEM else ""
        assert reader.reason.startswith(f"fell back to preadv (buffered): {uring}O_DIRECT unavailable")
        assert reader.reason.endswith(f"{tmpfs_file} is on tmpfs, in memory: O_DIRECT would be a plain memory copy")
        await read_random_ranges(reader, arena, file_bytes, np.random.default_rng(SEED + 3), 20)
        await reader.close()

    run_on_uvloop(scenario())


def test_forced_uring_on_tmpfs_raises_instead_of_falling_back(tmpfs_file, arena):
    async def scenario():
        fds_before = open_fds()
        expected = (f"cannot run here: {re.escape(URING_PROBLEM)}" if URING_PROBLEM
                    else f"needs O_DIRECT: {tmpfs_file} is on tmpfs")
        with pytest.raises(IoBackendUnavailableError, match=expected):
            open_reader("uring", [tmpfs_file], memoryview(arena), queue_depth=2)
        assert open_fds() <= fds_before

    run_on_uvloop(scenario())


def test_without_io_uring_auto_falls_back_and_forced_uring_raises(disk_file, arena, monkeypatch):
    """Simulates a kernel or sandbox without io_uring (the probe itself is exercised above)."""
    monkeypatch.setattr(backend, "probe_io_uring", lambda: "io_uring_setup failed: [Errno 1] blocked")

    async def scenario():
        reader = open_reader("auto", [disk_file], memoryview(arena), queue_depth=2)
        assert (reader.name, reader.o_direct) == ("preadv", True)
        assert reader.reason == (
            "fell back to preadv (O_DIRECT): io_uring unavailable: io_uring_setup failed: [Errno 1] blocked"
        )
        await reader.close()
        with pytest.raises(IoBackendUnavailableError, match="'uring' cannot run here: io_uring_setup failed"):
            open_reader("uring", [disk_file], memoryview(arena), queue_depth=2)

    run_on_uvloop(scenario())


@requires_io_uring
def test_io_uring_probe_finds_it_on_this_machine():
    assert backend.probe_io_uring() is None


def test_a_liburing_that_crashes_is_a_reason_not_a_dead_process(disk_file, arena, monkeypatch):
    """The probe runs out of process: a liburing binary this CPU cannot run (SIGILL) becomes the
    fallback's reason, and a forced uring names it."""
    monkeypatch.setattr(backend, "_URING_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    backend.probe_io_uring.cache_clear()
    try:
        problem = backend.probe_io_uring()
        assert problem == ("the liburing package crashed with SIGILL while setting up a ring "
                           "(its binary uses instructions this CPU lacks)")

        async def scenario():
            reader = open_reader("auto", [disk_file], memoryview(arena), queue_depth=2)
            assert (reader.name, reader.o_direct) == ("preadv", True)
            assert reader.reason == f"fell back to preadv (O_DIRECT): io_uring unavailable: {problem}"
            await reader.close()
            with pytest.raises(IoBackendUnavailableError, match="'uring' cannot run here: the liburing package crashed"):
                open_reader("uring", [disk_file], memoryview(arena), queue_depth=2)

        run_on_uvloop(scenario())
    finally:
        backend.probe_io_uring.cache_clear()


def test_o_direct_probes_on_this_machine(disk_file, tmpfs_file):
    assert backend.probe_o_direct(disk_file) is None
    assert backend.probe_o_direct(tmpfs_file).endswith("is on tmpfs, in memory: O_DIRECT would be a plain memory copy")
    # procfs refuses O_DIRECT outright (as tmpfs did before Linux 6.6)
    assert backend.probe_o_direct(Path("/proc/version")) == (
        "/proc/version: open with O_DIRECT failed: [Errno 22] Invalid argument"
        " (the filesystem does not support O_DIRECT)"
    )


async def submit_in_order(reader, arena, priorities, offsets):
    """Submit one page read per priority, each after the previous reached the pump; log completions."""
    view = memoryview(arena)
    completions: list[int] = []
    futures = []
    for index, (priority, offset) in enumerate(zip(priorities, offsets)):
        future = reader.submit(0, offset, PAGE, view[index * PAGE : (index + 1) * PAGE], priority)
        future.add_done_callback(lambda _, index=index: completions.append(index))
        futures.append(future)
        if index == 0:
            await asyncio.sleep(0)  # the pump starts the first read; the others queue behind it
    view.release()
    return futures, completions


@pytest.mark.parametrize("kind", BACKENDS)
def test_foreground_read_overtakes_queued_prefetches(kind, disk_file, arena):
    async def scenario():
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=1)
        priorities = ["prefetch"] * 8 + ["foreground"]
        futures, completions = await submit_in_order(reader, arena, priorities, [i * 7 * PAGE for i in range(9)])
        await asyncio.gather(*futures)
        assert completions == [0, 8, 1, 2, 3, 4, 5, 6, 7]
        assert futures[8].result().queue_wait_us < futures[7].result().queue_wait_us
        await reader.close()

    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", BACKENDS)
def test_cancel_and_promote_queued_prefetches(kind, disk_file, file_bytes, arena):
    async def scenario():
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=1)
        arena[: 4 * PAGE] = b"\xab" * (4 * PAGE)
        offsets = [0, 5 * PAGE, 9 * PAGE, 13 * PAGE]
        futures, completions = await submit_in_order(reader, arena, ["prefetch"] * 4, offsets)
        assert reader.num_in_flight == 1 and reader.num_queued == 3
        assert not reader.cancel(futures[0])  # in flight: cannot be called back
        assert reader.cancel(futures[2])
        assert not reader.cancel(futures[2])
        assert reader.promote(futures[3])
        await asyncio.gather(futures[0], futures[1], futures[3])
        assert futures[2].cancelled()
        assert [index for index in completions if index != 2] == [0, 3, 1]
        assert arena[2 * PAGE : 3 * PAGE] == b"\xab" * PAGE  # the cancelled read wrote nothing
        assert arena[3 * PAGE : 4 * PAGE] == file_bytes[13 * PAGE : 14 * PAGE]
        await reader.close()

    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", BACKENDS)
def test_read_past_end_of_file_names_file_offset_and_size(kind, disk_file, arena):
    async def scenario():
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=2)
        offset = FILE_NBYTES - PAGE
        with memoryview(arena) as view:
            future = reader.submit(0, offset, 2 * PAGE, view[: 2 * PAGE])
        with pytest.raises(IoReadError) as caught:
            await future
        error = caught.value
        assert (error.path, error.offset, error.nbytes) == (str(disk_file), offset, 2 * PAGE)
        assert str(error) == (
            f"{disk_file}: read of {2 * PAGE} bytes at offset {offset} came back short: "
            f"the file ends at byte {FILE_NBYTES} (got {PAGE} bytes)"
        )
        await reader.close()

    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", BACKENDS)
def test_file_truncated_under_the_reader_gives_a_short_read_error(kind, disk_file, arena):
    """The kernel returns part of the read, the continuation returns 0 bytes: an IoReadError."""

    async def scenario():
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=2)
        offset = 64 * PAGE
        os.truncate(disk_file, offset + 2 * PAGE)
        with memoryview(arena) as view:
            future = reader.submit(0, offset, 8 * PAGE, view[: 8 * PAGE])
        with pytest.raises(IoReadError, match=f"the file ends at byte {offset + 2 * PAGE} \\(got {2 * PAGE} bytes\\)"):
            await future
        await reader.close()

    run_on_uvloop(scenario())


@pytest.mark.parametrize("reader_class", [pytest.param(UringReader, marks=requires_io_uring), PreadvReader])
def test_kernel_error_names_file_and_errno(reader_class, tmp_path, arena):
    """Reading a directory fails in the kernel with EISDIR."""

    async def scenario():
        if reader_class is UringReader:
            reader = UringReader([tmp_path], memoryview(arena), 2, o_direct=False)
        else:
            reader = PreadvReader([tmp_path], 2, o_direct=False)
        with memoryview(arena) as view:
            future = reader.submit(0, 0, PAGE, view[:PAGE])
        with pytest.raises(IoReadError, match=f"{tmp_path}: read of 4096 bytes at offset 0 failed: \\[Errno 21\\]"):
            await future
        assert future.exception().errno == errno.EISDIR
        await reader.close()

    if filesystem_type(tmp_path) == "tmpfs" or os.stat(tmp_path).st_size < PAGE:
        pytest.skip("needs a directory whose size is at least one page")
    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", BACKENDS)
def test_malformed_requests_raise_at_once(kind, disk_file, arena):
    async def scenario():
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=2)
        view = memoryview(arena)
        with pytest.raises(IoRequestError, match="file index 1 out of range"):
            reader.submit(1, 0, PAGE, view[:PAGE])
        with pytest.raises(IoRequestError, match="must be multiples of 4096"):
            reader.submit(0, 100, PAGE, view[:PAGE])
        with pytest.raises(IoRequestError, match="must be multiples of 4096"):
            reader.submit(0, 0, PAGE, view[8 : 8 + PAGE])
        with pytest.raises(IoRequestError, match="destination holds 8192 bytes, the read is 4096 bytes"):
            reader.submit(0, 0, PAGE, view[: 2 * PAGE])
        with pytest.raises(IoRequestError, match="priority must be one of"):
            reader.submit(0, 0, PAGE, view[:PAGE], "urgent")
        with pytest.raises(IoRequestError, match="read-only"):
            reader.submit(0, 0, PAGE, view[:PAGE].toreadonly())
        await reader.close()
        with pytest.raises(IoRequestError, match="reader is closed"):
            reader.submit(0, 0, PAGE, view[:PAGE])
        view.release()

    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", ["auto", pytest.param("uring", marks=requires_io_uring), "preadv"])
def test_missing_file_is_a_store_error_naming_it(kind, disk_file, arena):
    missing = disk_file.parent / "missing.bin"

    async def scenario():
        fds_before = open_fds()
        with pytest.raises((StoreError, IoBackendUnavailableError), match=str(missing)):
            open_reader(kind, [disk_file, missing], memoryview(arena), queue_depth=2)
        assert open_fds() <= fds_before

    run_on_uvloop(scenario())


@pytest.mark.parametrize("kind", BACKENDS)
def test_close_with_reads_in_flight_leaks_nothing(kind, disk_file, file_bytes, arena):
    async def scenario():
        threads_before = set(threading.enumerate())
        fds_before = open_fds()
        reader = open_reader(kind, [disk_file], memoryview(arena), queue_depth=4, register_buffers=kind == "uring")
        nbytes = 256 * 1024
        futures = []
        with memoryview(arena) as view:
            for index in range(16):
                destination = view[index * nbytes : (index + 1) * nbytes]
                futures.append(reader.submit(0, index * nbytes, nbytes, destination, "prefetch"))
        await asyncio.sleep(0)
        assert reader.num_in_flight == 4
        await reader.close()
        assert reader.num_in_flight == 0
        finished = [index for index, future in enumerate(futures) if not future.cancelled()]
        assert finished == [0, 1, 2, 3]  # in flight: waited for; queued: cancelled
        for index in finished:
            start = index * nbytes
            assert arena[start : start + nbytes] == file_bytes[start : start + nbytes]
        assert open_fds() <= fds_before  # files, ring, eventfd
        assert set(threading.enumerate()) <= threads_before  # preadv pool threads joined

    run_on_uvloop(scenario())
