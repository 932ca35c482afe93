"""Open an expert store and read expert payloads with ordinary buffered reads.

The pipeline's I/O worker reads with io_uring and O_DIRECT into slots; this reader serves tools,
verification and reference computations.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from mer.errors import StoreError
from mer.compute.expert_format import ExpertPayload
from mer.store.manifest import Manifest


def payload_checksum(data) -> str:
    """The manifest's checksum of a payload (crc32 as 8 hex digits)."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


class ExpertStore:
    """A converted or synthetic expert store on disk."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = Path(directory)
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ExpertStore":
        directory = Path(directory)
        if not directory.is_dir():
            raise StoreError(f"{directory}: no such store directory")
        manifest = Manifest.load(directory)
        for entry in manifest.files:
            path = directory / entry.name
            if not path.is_file():
                raise StoreError(f"{path}: payload file listed in the manifest is missing")
            size = path.stat().st_size
            if size != entry.nbytes:
                raise StoreError(f"{path}: {size} bytes on disk, manifest says {entry.nbytes} (truncated?)")
        return cls(directory, manifest)

    def file_path(self, expert_id: int) -> Path:
        return self.directory / self.manifest.layer_of(expert_id).file

    def read_payload(self, expert_id: int) -> ExpertPayload:
        """Read one expert's payload (exactly `payload_nbytes` bytes) into a fresh array."""
        entry = self.manifest.expert(expert_id)
        expert_format = self.manifest.layers[entry.moe_layer].format
        data = np.empty(expert_format.payload_nbytes, dtype=np.uint8)
        with open(self.file_path(expert_id), "rb", buffering=0) as handle:
            handle.seek(entry.offset)
            count = handle.readinto(memoryview(data))
        if count != data.nbytes:
            raise StoreError(f"{self.file_path(expert_id)}: short read of {self.manifest.describe(expert_id)}")
        return ExpertPayload(expert_format, data)
