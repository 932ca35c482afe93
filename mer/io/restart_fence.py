"""The fence of a restarted I/O worker: it writes no slot until the router has dropped the dead one's leases.

A restarted I/O worker (`RunSpec.incarnation` > 0; the supervisor starts one in place of a dead or
stalled one) starts with an empty slot table over the same arena: it trusts nothing it has not read
itself (every slot FREE; each expert's first read is checked again), and its prefetch and policy
state start empty. Compute workers may still be reading slots under leases of the dead worker, so it
starts *fenced*: it writes no slot (no prefault of the arena, `Acquire` refused, prefetch hints
dropped) until the router's `LeasesDropped` says that no such lease is left (`mer.router.io_client.IoClient`).
Then it marks every slot empty in the arena with a generation above the dead worker's last one
(`SlotTable.continue_generations`), so that a stale reference could never match a slot it rewrites,
and serves as usual (`io_fence_lifted`).
"""

from __future__ import annotations

import time

from mer.cache.slot_table import SlotTable
from mer.errors import ProtocolError
from mer.protocol import Acquire, LeasesDropped, PrefetchHints
from mer.shm.arena import SlotArena
from mer.shm.layout import NO_EXPERT


class RestartFence:
    """Whether the worker is fenced, since when, and the prefetch hints it dropped meanwhile."""

    def __init__(self, incarnation: int, log):
        self.log = log
        self.is_fenced = incarnation > 0  # a restart: no slot is written before LeasesDropped
        self.fenced_at = time.monotonic()
        self.hints_dropped = 0  # prefetch hints dropped while fenced

    def check(self, message) -> None:
        """Refuse an Acquire while fenced, a LeasesDropped while not."""
        if isinstance(message, Acquire) and self.is_fenced:
            raise ProtocolError("Acquire before LeasesDropped: this I/O worker was restarted and writes no slot "
                                "until the router has dropped every lease of the dead one")
        if isinstance(message, LeasesDropped) and not self.is_fenced:
            raise ProtocolError("LeasesDropped to an I/O worker that is not fenced (not restarted, or lifted already)")

    def drop_hints(self, message: PrefetchHints) -> None:
        self.hints_dropped += len(message.hints)

    def lift(self, message: LeasesDropped, arena: SlotArena, table: SlotTable) -> None:
        """No lease of the dead I/O worker is left: mark every slot empty, at a generation above the dead
        worker's, and start writing slots."""
        generations = [arena.read_slot_header(slot).generation + 1 for slot in range(arena.num_slots)]
        for slot, generation in enumerate(generations):
            arena.write_slot_header(slot, generation, NO_EXPERT, 0)
        table.continue_generations(generations)
        self.is_fenced = False
        self.log.warning("io_fence_lifted", restarts=message.restarts,
                         fenced_s=round(time.monotonic() - self.fenced_at, 3), hints_dropped=self.hints_dropped,
                         max_generation=max(generations))
