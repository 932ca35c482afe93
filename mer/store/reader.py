"""Open an expert store and read expert payloads with ordinary buffered reads.

The pipeline's I/O worker reads with io_uring and O_DIRECT into slots; this reader serves tools,
verification and reference computations.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from mer.errors import StoreError, describe_os_error
from mer.compute.expert_format import ExpertPayload
from mer.store.manifest import Manifest


def _check_payload_file(path: Path, nbytes: int) -> None:
    """StoreError unless `path` is a readable regular file of `nbytes` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise StoreError(f"{path}: payload file listed in the manifest is missing") from None
    except OSError as error:
        raise StoreError(f"cannot read a payload file: {describe_os_error(error, path)}") from error
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{path}: payload file listed in the manifest is not a regular file")
    if info.st_size != nbytes:
        raise StoreError(f"{path}: {info.st_size} bytes on disk, manifest says {nbytes} (truncated?)")


class ExpertStore:
    """A converted or synthetic expert store on disk."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = Path(directory)
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ExpertStore":
        """The store at `directory`, its manifest checked and every payload file present, of the size the
        manifest says and readable by this user (so a run refuses at start, naming the file)."""
        directory = Path(directory)
        try:
            if not stat.S_ISDIR(directory.stat().st_mode):
                raise StoreError(f"{directory}: not a directory")
        except FileNotFoundError:
            raise StoreError(f"{directory}: no such store directory") from None
        except OSError as error:
            raise StoreError(f"cannot open the store: {describe_os_error(error, directory)}") from error
        manifest = Manifest.load(directory)
        for entry in manifest.files:
            _check_payload_file(directory / entry.name, entry.nbytes)
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
