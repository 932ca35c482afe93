"""The shared-memory slot arena (mer/shm): layout, alignment, read-only attach, a second process, O_DIRECT."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from mer.errors import ArenaError, ConfigError, StaleSlotError
from mer.runtime.paths import SHM_DIR, arena_path, new_run_id
from mer.shm import NO_EXPERT, SlotArena, read_arena_header, round_up_to_page

PAGE = 4096
NUM_SLOTS = 4
SLOT_NBYTES = 2 * PAGE


@pytest.fixture
def run_id():
    """A fresh run id; fails the test if anything named /dev/shm/mer-<run>-* is left behind (and removes it)."""
    run = new_run_id()
    yield run
    leftovers = sorted(SHM_DIR.glob(f"mer-{run}-*"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    assert not leftovers, f"left behind: {leftovers}"


@pytest.fixture
def arena(run_id):
    created = SlotArena.create(run_id, NUM_SLOTS, SLOT_NBYTES)
    try:
        yield created
    finally:
        created.destroy()


def address_of(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def test_create_writes_the_documented_layout(run_id):
    num_slots = 65  # 65 slot headers of 64 bytes need two pages
    with SlotArena.create(run_id, num_slots, SLOT_NBYTES) as arena:
        path = SHM_DIR / f"mer-{run_id}-arena"
        assert arena.path == path == arena_path(run_id)
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert arena.data_offset == PAGE + 2 * PAGE
        assert info.st_size == 3 * PAGE + num_slots * SLOT_NBYTES
        raw = path.read_bytes()
        magic, version, slots, slot_nbytes, data_offset, pid, run = struct.unpack_from("<8sIIQQI8s", raw, 0)
        assert (magic, version, slots, slot_nbytes, data_offset) == (b"MERARENA", 1, num_slots, SLOT_NBYTES, 3 * PAGE)
        assert (pid, run) == (os.getpid(), run_id.encode())
        for slot in (0, num_slots - 1):
            assert struct.unpack_from("<QqQ", raw, PAGE + 64 * slot) == (0, NO_EXPERT, 0)
        header = read_arena_header(path)
        assert (header.num_slots, header.supervisor_pid, header.run_id) == (num_slots, os.getpid(), run_id)
    assert not path.exists()


def test_create_touches_no_slot_pages(run_id):
    slot_nbytes = 64 * 2**20
    started = time.perf_counter()
    with SlotArena.create(run_id, 4, slot_nbytes) as arena:
        elapsed_s = time.perf_counter() - started
        allocated = os.stat(arena.path).st_blocks * 512
        assert allocated <= arena.data_offset, f"{allocated} bytes committed at creation"
        assert elapsed_s < 0.5, f"creating a sparse 256 MiB arena took {elapsed_s:.3f} s"


def test_background_prefault_backs_every_slot_page_while_this_thread_goes_on(run_id):
    import threading

    from mer.shm import prefault as prefault_module

    slot_nbytes = 48 * 2**20  # 192 MiB: three 64 MiB chunks
    done = threading.Event()
    results = []

    def on_done(seconds, error):
        results.append((seconds, error))
        done.set()

    with SlotArena.create(run_id, 4, slot_nbytes) as arena:
        writer = SlotArena.attach(arena.path, writable=True)
        try:
            background = writer.prefault_in_background(on_done)
            assert background is not None  # this kernel has MADV_POPULATE_WRITE
            assert background.populated >= min(prefault_module.CHUNK_NBYTES, 4 * slot_nbytes)  # the first chunk
            writer.slot_array(3)[:4] = 7  # a write beside the thread, into a slot it may not have reached
            assert done.wait(30), "the background prefault did not finish"
            seconds, error = results[0]
            assert error is None and seconds > 0 and background.is_done
            allocated = os.stat(arena.path).st_blocks * 512
            assert allocated >= 4 * slot_nbytes, f"only {allocated:,} bytes backed"
            assert list(writer.slot_array(3)[:5]) == [7, 7, 7, 7, 0]  # populating kept the written bytes
            background.stop()
        finally:
            writer.close()


def test_stopping_a_background_prefault_ends_it_before_the_arena_is_unmapped(run_id):
    with SlotArena.create(run_id, 8, 64 * 2**20) as arena:  # 512 MiB
        writer = SlotArena.attach(arena.path, writable=True)
        background = writer.prefault_in_background(lambda seconds, error: None)
        background.stop()
        assert not background._thread.is_alive()
        assert background.populated <= 8 * 64 * 2**20
        writer.close()


def test_slot_views_are_page_aligned_disjoint_and_land_in_the_file(arena):
    base = address_of(arena.slot_view(0))
    for slot in range(NUM_SLOTS):
        view, array = arena.slot_view(slot), arena.slot_array(slot)
        assert len(view) == array.nbytes == SLOT_NBYTES
        assert address_of(view) % PAGE == 0 and array.ctypes.data % PAGE == 0
        assert address_of(view) - base == slot * SLOT_NBYTES
        array[:] = slot + 1
    raw = arena.path.read_bytes()
    for slot in range(NUM_SLOTS):
        start = arena.data_offset + slot * SLOT_NBYTES
        assert raw[start:start + SLOT_NBYTES] == bytes([slot + 1]) * SLOT_NBYTES


def test_slot_headers_round_trip_and_check_slot_refuses_stale_ones(arena):
    arena.write_slot_header(2, generation=5, expert_id=41, payload_nbytes=5000)
    header = arena.read_slot_header(2)
    assert (header.generation, header.expert_id, header.payload_nbytes) == (5, 41, 5000)
    assert arena.check_slot(2, 5, 41) == header
    with pytest.raises(StaleSlotError, match="holds expert 41 generation 5, expected expert 41 generation 4"):
        arena.check_slot(2, 4, 41)
    with pytest.raises(StaleSlotError, match="expected expert 40 generation 5"):
        arena.check_slot(2, 5, 40)
    with pytest.raises(ArenaError, match="does not fit a slot"):
        arena.write_slot_header(2, 6, 41, SLOT_NBYTES + 1)
    with pytest.raises(ArenaError, match=r"slot 4 out of range \[0, 4\)"):
        arena.read_slot_header(4)
    assert arena.read_slot_header(1).expert_id == NO_EXPERT


def test_read_only_attach_sees_writes_and_refuses_its_own(arena):
    reader = SlotArena.attach(arena.path, writable=False)
    try:
        arena.slot_array(1)[:3] = (7, 8, 9)
        arena.write_slot_header(1, 3, 12, 3)
        assert bytes(reader.slot_view(1)[:3]) == b"\x07\x08\x09"
        assert reader.check_slot(1, 3, 12).payload_nbytes == 3
        assert (reader.num_slots, reader.slot_nbytes, reader.run_id) == (NUM_SLOTS, SLOT_NBYTES, arena.run_id)
        with pytest.raises(ValueError, match="read-only"):
            reader.slot_array(1)[0] = 1
        with pytest.raises(TypeError):
            reader.slot_view(1)[0] = 1
        with pytest.raises(ArenaError, match="read-only"):
            reader.write_slot_header(1, 4, 12, 3)
    finally:
        reader.close()
    with pytest.raises(ArenaError, match="closed"):
        reader.read_slot_header(0)


RAW_WRITE_SCRIPT = """
import ctypes, sys
import numpy as np
from mer.shm import SlotArena
arena = SlotArena.attach(sys.argv[1], writable=sys.argv[2] == "writable")
address = np.frombuffer(arena.slot_view(0), dtype=np.uint8).ctypes.data
ctypes.memset(address, 0x5A, 16)
print("wrote")
"""


def test_read_only_mapping_faults_on_a_raw_memory_write(arena):
    """PROT_READ is real: a write that bypasses Python's checks kills the process with SIGSEGV."""
    for mode in ("read-only", "writable"):
        completed = subprocess.run([sys.executable, "-c", RAW_WRITE_SCRIPT, str(arena.path), mode],
                                   capture_output=True, text=True, timeout=60)
        if mode == "read-only":
            assert completed.returncode == -signal.SIGSEGV, completed.stderr
            assert bytes(arena.slot_view(0)[:16]) == bytes(16)
        else:
            assert (completed.returncode, completed.stdout.strip()) == (0, "wrote"), completed.stderr
            assert bytes(arena.slot_view(0)[:16]) == b"\x5a" * 16


def read_slot_in_child(path: str, slot: int, connection) -> None:
    """Spawned child: attach read-only, check the slot header, send back what it read."""
    arena = SlotArena.attach(path, writable=False)
    header = arena.read_slot_header(slot)
    arena.check_slot(slot, header.generation, header.expert_id)
    payload = bytes(arena.slot_view(slot)[:header.payload_nbytes])
    aligned = address_of(arena.slot_view(slot)) % PAGE == 0
    connection.send((header.generation, header.expert_id, hashlib.sha256(payload).hexdigest(), aligned))
    arena.close()


def test_a_spawned_process_reads_what_this_one_wrote(arena):
    payload = np.random.default_rng(3).integers(0, 256, SLOT_NBYTES - 100, dtype=np.uint8)
    arena.slot_array(2)[:payload.size] = payload
    arena.write_slot_header(2, 9, 77, payload.size)
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=read_slot_in_child, args=(str(arena.path), 2, sender))
    child.start()
    try:
        assert receiver.poll(60), "the child sent nothing"
        generation, expert_id, digest, aligned = receiver.recv()
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert (generation, expert_id, aligned) == (9, 77, True)
    assert digest == hashlib.sha256(payload.tobytes()).hexdigest()


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point in /proc/self/mounts."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount_point = fields[1].replace("\\040", " ")
        contains = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if contains and len(mount_point) > len(best):
            best, kind = mount_point, fields[2]
    return kind


@pytest.fixture
def direct_io_dir(tmp_path):
    """A directory on a filesystem that supports O_DIRECT: tmp_path unless it is tmpfs, else one under /work."""
    if filesystem_type(tmp_path) != "tmpfs":
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="mer-test-odirect-", dir="/work"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_an_o_direct_read_lands_in_a_slot(arena, direct_io_dir):
    payload = np.random.default_rng(5).integers(0, 256, PAGE + 100, dtype=np.uint8).tobytes()
    path = direct_io_dir / "expert.bin"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        target = arena.slot_view(1)[:round_up_to_page(len(payload))]
        assert os.preadv(fd, [target], 0) == len(payload)  # a short read at end of file
    finally:
        os.close(fd)
    assert bytes(arena.slot_view(1)[:len(payload)]) == payload
    assert bytes(arena.slot_view(1)[len(payload):]) == bytes(SLOT_NBYTES - len(payload))


def test_an_arena_larger_than_memory_fails_before_creating_a_file(run_id):
    slot_nbytes = 2**30
    expected = r"4096 slots x 1,073,741,824 bytes \(4096.00 GiB\) does not fit: /dev/shm has .* GiB free, MemAvailable"
    with pytest.raises(ArenaError, match=expected):
        SlotArena.create(run_id, 4096, slot_nbytes)
    assert not arena_path(run_id).exists()


def test_create_twice_attach_missing_and_destroy_rules(arena, run_id):
    with pytest.raises(ArenaError, match="already exists"):
        SlotArena.create(run_id, NUM_SLOTS, SLOT_NBYTES)
    reader = SlotArena.attach(arena.path, writable=True)
    with pytest.raises(ArenaError, match="only the process that created"):
        reader.destroy()
    view = reader.slot_array(0)
    arena.destroy()
    assert not arena.path.exists()
    view[0] = 3  # an attached mapping outlives the unlink
    assert view[0] == 3
    reader.close()  # with a view still alive: no error, the mapping goes with the view
    with pytest.raises(ArenaError, match="does not exist"):
        SlotArena.attach(arena.path, writable=False)


def test_bad_layouts_and_run_ids_are_refused(run_id):
    with pytest.raises(ArenaError, match="slot_nbytes must be a positive multiple of 4096, got 5000"):
        SlotArena.create(run_id, 2, 5000)
    with pytest.raises(ArenaError, match="num_slots"):
        SlotArena.create(run_id, 0, PAGE)
    with pytest.raises(ConfigError, match="run id"):
        SlotArena.create("../etc", 2, PAGE)
    assert round_up_to_page(1) == PAGE and round_up_to_page(PAGE) == PAGE and round_up_to_page(PAGE + 1) == 2 * PAGE


def test_attach_refuses_malformed_files(arena, tmp_path):
    good = arena.path.read_bytes()
    cases = {
        "magic": (b"NOTARENA" + good[8:], "not a slot arena"),
        "version": (good[:8] + struct.pack("<I", 99) + good[12:], "arena version 99"),
        "short": (good[:-PAGE], "header describes"),
        "data_offset": (good[:24] + struct.pack("<Q", 12345) + good[32:], "data_offset 12345"),
        "slot_nbytes": (good[:16] + struct.pack("<Q", 100) + good[24:], "slot_nbytes must be"),
        "empty": (b"", "too short"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.arena"
        path.write_bytes(content)
        with pytest.raises(ArenaError, match=message) as caught:
            SlotArena.attach(path, writable=False)
        assert str(path) in str(caught.value)
