"""Shared memory: the slot arena that the I/O worker fills and compute workers read (`arena`, `layout`)."""

from mer.shm.arena import SlotArena, available_memory_nbytes, check_arena_fits
from mer.shm.layout import (
    NO_EXPERT,
    PAGE_NBYTES,
    ArenaHeader,
    ArenaLayout,
    SlotHeader,
    read_arena_header,
    round_up_to_page,
)

__all__ = [
    "NO_EXPERT",
    "PAGE_NBYTES",
    "ArenaHeader",
    "ArenaLayout",
    "SlotArena",
    "SlotHeader",
    "available_memory_nbytes",
    "check_arena_fits",
    "read_arena_header",
    "round_up_to_page",
]
