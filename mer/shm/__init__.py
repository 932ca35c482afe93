"""Shared memory: the slot arena that the I/O worker fills and compute workers read (`arena`, `layout`)."""

from mer.shm.arena import SlotArena
from mer.shm.layout import NO_EXPERT, read_arena_header, round_up_to_page

__all__ = ["NO_EXPERT", "SlotArena", "read_arena_header", "round_up_to_page"]
