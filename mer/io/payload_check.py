"""Integrity on the read path: an expert payload read into a slot is checked against the manifest's
checksum before the slot is granted.

The I/O worker checks the first read of each expert in its lifetime (`verify_reads`: every read).
The crc32 (`mer.store.checksum`, ISA-L where installed) runs in one helper thread, off the event
loop, while the reads after it stay in flight; the slot stays LOADING until the check is done, so a
payload that does not match is never granted, never computed with. The thread gets the slot's bytes
and returns only the checksum and its time: nothing that holds the slot's memory outlives the
check (the arena could not be unmapped otherwise).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mer.errors import PayloadChecksumError
from mer.store.checksum import payload_checksum
from mer.store.manifest import Manifest


def timed_checksum(payload: memoryview) -> tuple[str, float]:
    """The payload's checksum and the microseconds it took (runs in the helper thread)."""
    started = time.perf_counter()
    checksum = payload_checksum(payload)
    return checksum, (time.perf_counter() - started) * 1e6


class PayloadChecker:
    """Which reads are checked, and the helper thread that checks them."""

    def __init__(self, manifest: Manifest, store: Path, *, every_read: bool):
        self.manifest = manifest
        self.store = Path(store)
        self.every_read = every_read
        self.verified: set[int] = set()  # experts whose payload matched in this process
        self.num_checks = 0
        self.num_failures = 0
        self.checked_nbytes = 0
        self.check_us = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-check")

    def needs_check(self, expert_id: int) -> bool:
        return self.every_read or expert_id not in self.verified

    def start(self, payload: memoryview) -> asyncio.Future:
        """Checksum `payload` in the helper thread: a future of `(checksum, microseconds)`."""
        return asyncio.get_running_loop().run_in_executor(self._executor, timed_checksum, payload)

    def finish(self, expert_id: int, checksum: str, check_us: float) -> None:
        """Account one finished check; raise `PayloadChecksumError` if `checksum` is not the manifest's."""
        entry = self.manifest.expert(expert_id)
        nbytes = self.manifest.layers[entry.moe_layer].format.payload_nbytes
        self.num_checks += 1
        self.checked_nbytes += nbytes
        self.check_us += check_us
        if checksum != entry.checksum:
            self.num_failures += 1
            self.verified.discard(expert_id)
            path = self.store / self.manifest.layers[entry.moe_layer].file
            raise PayloadChecksumError(
                f"{self.manifest.describe(expert_id)}: checksum mismatch in {path} at offset {entry.offset} "
                f"({nbytes} bytes): crc32 {checksum}, the manifest says {entry.checksum}; the store is corrupt "
                f"(`mer-pipeline store verify {self.store}` lists every bad expert); the expert was not computed")
        self.verified.add(expert_id)

    def figures(self) -> dict:
        """What the checks cost so far, for the `payload_checks` event."""
        seconds = self.check_us / 1e6
        return {"checks": self.num_checks, "failures": self.num_failures, "nbytes": self.checked_nbytes,
                "check_s": round(seconds, 6), "experts_verified": len(self.verified), "every_read": self.every_read,
                "gbps": round(self.checked_nbytes / seconds / 1e9, 2) if seconds > 0 else 0.0}

    def close(self) -> None:
        """Wait for a check in progress (it reads the arena) and drop the queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)
