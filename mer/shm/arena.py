"""The shared-memory slot arena: one `/dev/shm/mer-<run>-arena` file mapped with `mmap` by every process.

Byte layout: `mer.shm.layout`. Roles:

- the supervisor `create`s the arena (O_CREAT|O_EXCL, mode 0600, sized with ftruncate; pages are
  not touched, so creation is instant and memory is committed only as slots are first written)
  and `destroy`s it (unlink) at shutdown;
- the I/O worker `attach`es it writable: it writes slot headers (`write_slot_header`, when a slot
  is assigned, before the read starts) and reads expert payloads into `slot_view(slot)`;
- compute workers `attach` it read-only (PROT_READ: a write faults) and `check_slot` the slot
  header against the (generation, expert_id) of each job before and after computing.

Not `multiprocessing.shared_memory`: on Python 3.11 attaching registers the segment with the
resource tracker, which may unlink it under the other processes.

Views (`slot_view`, `slot_array`) keep the mapping alive: drop them before `close()`, or close()
leaves the mapping to be unmapped when the last view is garbage collected.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from mer.errors import ArenaError, StaleSlotError
from mer.runtime.paths import SHM_DIR, arena_path, check_run_id
from mer.shm.prefault import BackgroundPrefault, PrefaultUnsupported
from mer.shm.layout import (
    ARENA_HEADER_STRUCT,
    ARENA_MAGIC,
    ARENA_VERSION,
    NO_EXPERT,
    SLOT_HEADER_STRUCT,
    ArenaHeader,
    ArenaLayout,
    SlotHeader,
)

_GIB = 2**30


def available_memory_nbytes() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ArenaError("/proc/meminfo has no MemAvailable line")


def check_arena_fits(layout: ArenaLayout, shm_dir: Path = SHM_DIR) -> None:
    """Raise ArenaError, with the numbers, if the arena exceeds the free space of `shm_dir` or MemAvailable."""
    filesystem = os.statvfs(shm_dir)
    shm_free = filesystem.f_bavail * filesystem.f_frsize
    memory_free = available_memory_nbytes()
    need = layout.total_nbytes
    if need > shm_free or need > memory_free:
        raise ArenaError(
            f"slot arena of {layout.num_slots} slots x {layout.slot_nbytes:,} bytes ({need / _GIB:.2f} GiB) does not "
            f"fit: {shm_dir} has {shm_free / _GIB:.2f} GiB free, MemAvailable is {memory_free / _GIB:.2f} GiB; "
            f"use fewer cache slots"
        )


MADV_POPULATE_WRITE = 23  # linux/mman.h; not exported by Python's mmap module


class SlotArena:
    """A mapped slot arena. Build with `SlotArena.create` (owner) or `SlotArena.attach`."""

    def __init__(self, path: Path, mapping: mmap.mmap, header: ArenaHeader, *, is_writable: bool, is_owner: bool):
        self.path = path
        self.header = header
        self.layout = header.layout(path)
        self.is_writable = is_writable
        self.is_owner = is_owner
        self._mapping = mapping
        self._buffer: memoryview | None = memoryview(mapping)

    # ---- life cycle ----------------------------------------------------------------------------

    @classmethod
    def create(cls, run_id: str, num_slots: int, slot_nbytes: int, *, supervisor_pid: int | None = None) -> SlotArena:
        """Create `/dev/shm/mer-<run_id>-arena` (it must not exist), map it writable, and own it."""
        layout = ArenaLayout(num_slots, slot_nbytes)
        path = arena_path(check_run_id(run_id))
        check_arena_fits(layout, path.parent)
        header = ArenaHeader(ARENA_VERSION, num_slots, slot_nbytes, layout.data_offset,
                             supervisor_pid if supervisor_pid is not None else os.getpid(), run_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ArenaError(f"slot arena {path} already exists (run id reused, or a stale run: clean up)") from None
        try:
            os.ftruncate(fd, layout.total_nbytes)
            mapping = mmap.mmap(fd, layout.total_nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            os.unlink(path)
            raise ArenaError(f"cannot create slot arena {path} of {layout.total_nbytes:,} bytes: {error}") from error
        finally:
            os.close(fd)
        arena = cls(path, mapping, header, is_writable=True, is_owner=True)
        try:
            for slot in range(num_slots):
                arena.write_slot_header(slot, 0, NO_EXPERT, 0)
            packed = header.pack()
            mapping[len(ARENA_MAGIC):len(packed)] = packed[len(ARENA_MAGIC):]
            mapping[:len(ARENA_MAGIC)] = packed[:len(ARENA_MAGIC)]  # last: a valid magic means a complete header
        except BaseException:
            arena.destroy()
            raise
        return arena

    @classmethod
    def attach(cls, path: Path | str, *, writable: bool) -> SlotArena:
        """Map an existing arena: writable (the I/O worker) or read-only with PROT_READ (compute workers)."""
        path = Path(path)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArenaError(f"slot arena {path} does not exist") from None
        try:
            size = os.fstat(fd).st_size
            header = ArenaHeader.unpack(os.pread(fd, ARENA_HEADER_STRUCT.size, 0), path)
            expected = header.layout(path).total_nbytes
            if size != expected:
                raise ArenaError(f"{path}: file is {size:,} bytes, its header describes {expected:,}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        return cls(path, mapping, header, is_writable=writable, is_owner=False)

    def close(self) -> None:
        """Unmap (if no view of a slot is still alive). Idempotent."""
        if self._buffer is not None:
            self._buffer.release()
            self._buffer = None
        try:
            self._mapping.close()
        except BufferError:
            pass  # views handed out are still alive; the mapping goes when they do

    def destroy(self) -> None:
        """Owner only: close and unlink the arena file (processes that attached keep their mapping)."""
        if not self.is_owner:
            raise ArenaError(f"{self.path}: only the process that created the arena may destroy it")
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SlotArena:
        return self

    def __exit__(self, *exc_info) -> None:
        """The owner destroys the arena, others close their mapping."""
        if self.is_owner:
            self.destroy()
        else:
            self.close()

    # ---- header fields -------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self.layout.num_slots

    @property
    def slot_nbytes(self) -> int:
        return self.layout.slot_nbytes

    @property
    def data_offset(self) -> int:
        return self.layout.data_offset

    @property
    def run_id(self) -> str:
        return self.header.run_id

    # ---- slots ---------------------------------------------------------------------------------

    def slot_view(self, slot: int) -> memoryview:
        """The slot's data (`slot_nbytes`, 4096-aligned) as a memoryview; read-only unless attached writable."""
        start = self.layout.slot_data_offset(self._check_slot_index(slot))
        return self._open_buffer()[start:start + self.slot_nbytes]

    def data_address(self) -> int:
        """The address of the first slot's data in this process (for madvise through ctypes)."""
        anchor = ctypes.c_char.from_buffer(self._mapping)  # writable attach only; released below
        try:
            return ctypes.addressof(anchor) + self.data_offset
        finally:
            del anchor

    def prefault_in_background(self, on_done) -> BackgroundPrefault | None:
        """Back every slot page with memory from a background thread (`mer.shm.prefault`); returns it
        (stop it before `close`), or None when the kernel lacks MADV_POPULATE_WRITE and the pages were
        touched here instead."""
        if not self.is_writable:
            raise ArenaError(f"{self.path}: attached read-only, cannot prefault")
        try:
            return BackgroundPrefault(self.data_address(), self.layout.total_nbytes - self.data_offset,
                                      on_done).start()
        except PrefaultUnsupported:
            self.prefault()
            return None

    def prefault(self) -> str:
        """Back every slot page with memory now (writable attach only), so reads never pay first touch.

        First touch of fresh shared memory costs ~60-80 ms per 100 MB here; paying it once at start-up
        keeps it out of the read latencies. Uses madvise(MADV_POPULATE_WRITE) where the kernel has it
        (Linux 5.14+), else writes one zero byte per page. Returns the method used.
        """
        if not self.is_writable:
            raise ArenaError(f"{self.path}: attached read-only, cannot prefault")
        try:
            self._mapping.madvise(MADV_POPULATE_WRITE, self.data_offset, self.layout.total_nbytes - self.data_offset)
            return "madvise"
        except (OSError, ValueError):
            pages = np.frombuffer(self.data_view(), dtype=np.uint8)[::mmap.PAGESIZE]
            pages[:] = 0
            return "touch"

    def data_view(self) -> memoryview:
        """All slots' data (from `data_offset` to the end) as one memoryview, e.g. to register with io_uring."""
        return self._open_buffer()[self.data_offset:]

    def slot_array(self, slot: int) -> np.ndarray:
        """The slot's data as a uint8 numpy array (no copy); not writeable unless attached writable."""
        return np.frombuffer(self.slot_view(slot), dtype=np.uint8)

    def write_slot_header(self, slot: int, generation: int, expert_id: int, payload_nbytes: int) -> None:
        """Record which expert the slot holds (I/O worker, when it assigns the slot, before the read starts)."""
        if not self.is_writable:
            raise ArenaError(f"{self.path}: attached read-only, cannot write the header of slot {slot}")
        if not 0 <= payload_nbytes <= self.slot_nbytes:
            raise ArenaError(f"{self.path}: payload of {payload_nbytes:,} bytes does not fit a slot of "
                             f"{self.slot_nbytes:,}")
        offset = self.layout.slot_header_offset(self._check_slot_index(slot))
        SLOT_HEADER_STRUCT.pack_into(self._open_buffer(), offset, generation, expert_id, payload_nbytes)

    def read_slot_header(self, slot: int) -> SlotHeader:
        offset = self.layout.slot_header_offset(self._check_slot_index(slot))
        return SlotHeader(*SLOT_HEADER_STRUCT.unpack_from(self._open_buffer(), offset))

    def check_slot(self, slot: int, generation: int, expert_id: int) -> SlotHeader:
        """The slot's header if it holds (generation, expert_id); else raise StaleSlotError."""
        header = self.read_slot_header(slot)
        if header.generation != generation or header.expert_id != expert_id:
            raise StaleSlotError(
                f"slot {slot} of {self.path} holds expert {header.expert_id} generation {header.generation}, "
                f"expected expert {expert_id} generation {generation}"
            )
        return header

    def _check_slot_index(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise ArenaError(f"{self.path}: slot {slot} out of range [0, {self.num_slots})")
        return slot

    def _open_buffer(self) -> memoryview:
        if self._buffer is None:
            raise ArenaError(f"{self.path}: the arena is closed")
        return self._buffer
