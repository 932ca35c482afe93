"""Byte layout of the slot arena file (all integers little-endian).

```
offset 0            arena header, 4096 bytes:
                      magic b"MERARENA" (8), version u32, num_slots u32, slot_nbytes u64,
                      data_offset u64, supervisor pid u32, run id (8 bytes ascii); the rest zero
offset 4096         slot headers, 64 bytes each: generation u64, expert_id i64 (-1 = none),
                      payload_nbytes u64, 40 bytes reserved; the region rounded up to 4096
offset data_offset  slot 0 data, slot 1 data, ... each slot_nbytes (a multiple of 4096)
```

The arena's mapping starts on a page boundary, so every slot's data is 4096-aligned and can be the
target of an O_DIRECT read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mer.errors import ArenaError

PAGE_NBYTES = 4096
ARENA_MAGIC = b"MERARENA"
ARENA_VERSION = 1
ARENA_HEADER_NBYTES = PAGE_NBYTES
SLOT_HEADER_NBYTES = 64
NO_EXPERT = -1

ARENA_HEADER_STRUCT = struct.Struct("<8sIIQQI8s")
SLOT_HEADER_STRUCT = struct.Struct("<QqQ")
_MAX_U32 = 2**32 - 1


def round_up_to_page(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of 4096 (the size of a slot that holds such a payload)."""
    return -(-nbytes // PAGE_NBYTES) * PAGE_NBYTES


@dataclass(frozen=True)
class ArenaLayout:
    """Where everything lies in an arena of `num_slots` slots of `slot_nbytes` bytes."""

    num_slots: int
    slot_nbytes: int

    def __post_init__(self) -> None:
        if not 1 <= self.num_slots <= _MAX_U32:
            raise ArenaError(f"num_slots must be in [1, {_MAX_U32}], got {self.num_slots}")
        if self.slot_nbytes <= 0 or self.slot_nbytes % PAGE_NBYTES:
            raise ArenaError(f"slot_nbytes must be a positive multiple of {PAGE_NBYTES}, got {self.slot_nbytes}")

    @property
    def data_offset(self) -> int:
        return ARENA_HEADER_NBYTES + round_up_to_page(self.num_slots * SLOT_HEADER_NBYTES)

    @property
    def total_nbytes(self) -> int:
        return self.data_offset + self.num_slots * self.slot_nbytes

    def slot_header_offset(self, slot: int) -> int:
        return ARENA_HEADER_NBYTES + slot * SLOT_HEADER_NBYTES

    def slot_data_offset(self, slot: int) -> int:
        return self.data_offset + slot * self.slot_nbytes


@dataclass(frozen=True)
class ArenaHeader:
    """The arena header's fields."""

    version: int
    num_slots: int
    slot_nbytes: int
    data_offset: int
    supervisor_pid: int
    run_id: str

    def pack(self) -> bytes:
        return ARENA_HEADER_STRUCT.pack(ARENA_MAGIC, self.version, self.num_slots, self.slot_nbytes,
                                        self.data_offset, self.supervisor_pid, self.run_id.encode("ascii"))

    @classmethod
    def unpack(cls, raw: bytes, path: Path) -> ArenaHeader:
        """Parse and validate a header read from `path`; raises ArenaError naming the path and field."""
        if len(raw) < ARENA_HEADER_STRUCT.size:
            raise ArenaError(f"{path}: {len(raw)} bytes, too short for an arena header")
        magic, version, num_slots, slot_nbytes, data_offset, pid, run_id = ARENA_HEADER_STRUCT.unpack_from(raw)
        if magic != ARENA_MAGIC:
            raise ArenaError(f"{path}: not a slot arena (magic {magic!r}, expected {ARENA_MAGIC!r})")
        if version != ARENA_VERSION:
            raise ArenaError(f"{path}: arena version {version}, this mer reads version {ARENA_VERSION}")
        try:
            run_id_text = run_id.decode("ascii")
        except UnicodeDecodeError:
            raise ArenaError(f"{path}: run id {run_id!r} is not ascii") from None
        header = cls(version, num_slots, slot_nbytes, data_offset, pid, run_id_text)
        layout = header.layout(path)
        if layout.data_offset != data_offset:
            raise ArenaError(f"{path}: data_offset {data_offset}, expected {layout.data_offset} for {num_slots} slots")
        return header

    def layout(self, path: Path) -> ArenaLayout:
        try:
            return ArenaLayout(self.num_slots, self.slot_nbytes)
        except ArenaError as error:
            raise ArenaError(f"{path}: {error}") from None


@dataclass(frozen=True)
class SlotHeader:
    """A slot header's fields: which expert (generation, expert_id) the slot holds and its payload size."""

    generation: int
    expert_id: int
    payload_nbytes: int


def read_arena_header(path: Path) -> ArenaHeader:
    """Read and validate the header of the arena file at `path` without mapping it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArenaError(f"slot arena {path} does not exist") from None
    try:
        raw = os.pread(fd, ARENA_HEADER_STRUCT.size, 0)
    finally:
        os.close(fd)
    return ArenaHeader.unpack(raw, path)
