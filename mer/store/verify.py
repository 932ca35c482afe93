"""Check every expert payload of a store against the manifest's checksums."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mer.store.checksum import payload_checksum
from mer.store.direct_io import open_direct, page_aligned_empty, pread_into
from mer.store.manifest import ExpertEntry, Manifest
from mer.store.reader import ExpertStore


def find_bad_experts(directory: Path, manifest: Manifest, progress: Callable[[int], None] | None = None) -> list[int]:
    """Ids of experts whose payload bytes on disk do not match their checksum.

    Reads with O_DIRECT where possible (no page-cache pollution, full disk speed) into two aligned
    buffers, checksumming one in a helper thread while the next is read.
    """
    bad = []
    buffers = [page_aligned_empty(manifest.slot_nbytes) for _ in range(2)]
    pending: tuple[Future, ExpertEntry] | None = None
    count_read = 0

    def collect() -> None:
        future, entry = pending
        if future.result() != entry.checksum:
            bad.append(entry.id)
        if progress is not None:
            progress(manifest.layer_of(entry.id).format.payload_nbytes)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-verify") as pool:
        for layer in manifest.layers:
            fd, _ = open_direct(Path(directory) / layer.file, os.O_RDONLY)
            try:
                for entry in manifest.held_in_layer(layer.moe_layer):  # every expert, or a shard's
                    buffer = buffers[count_read % 2][: layer.format.read_nbytes]  # not the one being checked
                    count_read += 1
                    count = pread_into(fd, buffer, entry.offset)
                    payload = buffer[: min(count, layer.format.payload_nbytes)]
                    if pending is not None:
                        collect()
                    pending = (pool.submit(payload_checksum, payload), entry)
            finally:
                os.close(fd)
        if pending is not None:
            collect()
    return sorted(bad)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of re-reading every payload of a store."""

    bad: tuple[int, ...]
    num_experts: int
    nbytes: int

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_store(directory: str | os.PathLike, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Open a store (missing or truncated files and bad manifests raise StoreError) and check
    every payload against its checksum; `progress(nbytes)` is called after each payload."""
    store = ExpertStore.open(directory)
    bad = find_bad_experts(store.directory, store.manifest, progress)
    return VerifyReport(tuple(bad), len(store.manifest.experts), store.manifest.total_payload_nbytes())
