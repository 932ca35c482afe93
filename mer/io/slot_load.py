"""One expert being loaded into a slot by the I/O worker, and what happens when its read fails.

Life of a load (`mer.io.slot_reads.SlotReads` drives it; the slot is LOADING throughout)::

    read submitted --ok--> [checksum check, when due: mer.io.payload_check] --match--> READY, granted
    read submitted --IoReadError--> wait READ_RETRY_DELAYS_S[attempt] --> read submitted again
    read submitted --IoReadError, retries spent--> failed: the slot is freed, every waiter gets the error
    checksum check --mismatch--> failed: the slot is freed, every waiter gets PayloadChecksumError
    read submitted --cancelled (a stale queued prefetch)--> the slot is freed
    read submitted --IoReadHungError (past read_deadline_s)--> failed, not retried: the slot is QUARANTINED

A failed load names the expert (layer, index, id) before the reader's own message, which names the
file, the offset and the size. The next acquire of that expert starts a fresh load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mer.errors import IoReadError
from mer.store.manifest import Manifest

READ_RETRY_DELAYS_S = (0.01, 0.05, 0.25)  # backoff before each retry of a failed read; then the load fails


@dataclass
class Load:
    """A read in flight into a slot (retries and the checksum check included)."""

    future: asyncio.Future  # resolves to the read latency in microseconds
    reader_future: asyncio.Future | None  # of the read in flight, or of the last one
    kind: str  # "foreground" or "prefetch"
    token: int = -1  # the token whose acquire (or prefetch hints) started the read
    t_submit: float = 0.0  # time.monotonic() when the read was submitted
    queue_depth: int = 0  # reads queued or in flight in the reader just after this one was submitted
    expert_id: int = -1
    generation: int = 0
    priority: str = ""  # the reader queue of its reads: its kind, until a foreground acquire joins a prefetch
    attempts: int = 1  # reads submitted, retries included
    retry: asyncio.TimerHandle | None = None  # the retry waiting out its backoff

    def __post_init__(self) -> None:
        self.priority = self.priority or self.kind

    @property
    def can_retry(self) -> bool:
        return self.attempts <= len(READ_RETRY_DELAYS_S)

    @property
    def retry_delay_s(self) -> float:
        return READ_RETRY_DELAYS_S[self.attempts - 1]


def injected_faults(manifest: Manifest, faults: Iterable[tuple]) -> dict[tuple[int, int], Any]:
    """`(expert id, count)` pairs (`MER_READ_FAULTS`) as the reader's `{(file index, offset): count}`, or
    `(expert id, count, seconds)` (its hangs) as `{(file index, offset): (count, seconds)}`; ids not in
    the store (or not held by a shard store) are ignored."""
    places = {}
    for expert_id, *value in faults:
        if 0 <= expert_id < manifest.geometry.num_experts and manifest.holds(expert_id):
            entry = manifest.expert(expert_id)
            places[(entry.moe_layer, entry.offset)] = value[0] if len(value) == 1 else tuple(value)
    return places


def read_failure(expert: str, error: BaseException, attempts: int) -> IoReadError:
    """The error of a load whose reads all failed: `expert` (its description) first, then the reader's
    message (file, offset, size, reason), then how often it was tried."""
    tried = f" (tried {attempts} times over {sum(READ_RETRY_DELAYS_S[:attempts - 1]):g} s)" if attempts > 1 else ""
    message = f"{expert}: {error}{tried}"
    if isinstance(error, IoReadError):  # an IoReadHungError stays one; its `released` stays with the reader
        return type(error)(message, error.path, error.offset, error.nbytes, error.errno)
    return IoReadError(message, "", -1, 0)
