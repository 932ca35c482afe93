"""Check every expert payload of a store against the manifest's checksums."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mer.store.manifest import Manifest
from mer.store.reader import payload_checksum


def find_bad_experts(
    directory: Path, manifest: Manifest, progress: Callable[[int], None] | None = None
) -> list[int]:
    """Ids of experts whose payload bytes on disk do not match their checksum."""
    bad = []
    buffer = np.empty(manifest.slot_nbytes, dtype=np.uint8)
    for layer in manifest.layers:
        nbytes = layer.format.payload_nbytes
        with open(Path(directory) / layer.file, "rb", buffering=0) as handle:
            for expert in range(manifest.geometry.experts_per_layer):
                entry = manifest.expert(manifest.expert_id(layer.moe_layer, expert))
                handle.seek(entry.offset)
                view = memoryview(buffer)[:nbytes]
                count = handle.readinto(view)
                if count != nbytes or payload_checksum(view) != entry.checksum:
                    bad.append(entry.id)
                if progress is not None:
                    progress(nbytes)
    return bad
