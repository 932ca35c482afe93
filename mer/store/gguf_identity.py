"""The content identity of a GGUF model: a hash that changes when any byte of its data changes.

Definition (the `source.hash` of a converted store): the lower-case hex SHA-256 of, for each part of
the model in order (one part for a single file),

    the part's header bytes [0, data_offset)  -- magic, version, metadata key/values, tensor infos
                                                 (names, types, shapes, offsets), alignment padding
    followed by, for each tensor in the part's tensor-info order,
    the CRC-32 (zlib's, computed by `mer.store.checksum.crc32`) of the tensor's data bytes as 4
    big-endian bytes.

Padding between tensors is not covered (it carries no data). CRC-32 per tensor keeps the cost near
the speed of reading (ISA-L's crc32 ~21 GB/s, zlib.crc32 ~2 GB/s, against ~0.9 GB/s for SHA-256 over
all bytes), and a
conversion computes the expert tensors' CRCs from the very bytes it copies, so the identity costs
one extra pass only over the non-expert tensors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from mer.store.checksum import crc32
from mer.store.gguf_files import GGUFPart, TensorData, open_listed_parts, open_parts


class TensorChecksums:
    """CRC-32 of tensor data accumulated piece by piece, in order (e.g. expert by expert while copying)."""

    def __init__(self) -> None:
        self._crcs: dict[str, int] = {}
        self._covered: dict[str, int] = {}

    def update(self, tensor: TensorData, piece) -> None:
        """Add the next `piece` of `tensor`'s bytes (pieces must come in order, without gaps)."""
        self._crcs[tensor.name] = crc32(piece, self._crcs.get(tensor.name, 0))
        self._covered[tensor.name] = self._covered.get(tensor.name, 0) + memoryview(piece).nbytes

    def crc(self, tensor: TensorData) -> int:
        """The tensor's CRC-32: accumulated if all its bytes were seen, computed now otherwise."""
        if self._covered.get(tensor.name) == tensor.nbytes:
            return self._crcs[tensor.name]
        return crc32(tensor.data)

    def identity(self, parts: Sequence[GGUFPart]) -> str:
        """The model's identity (see the module docstring) using the CRCs gathered so far."""
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part.header)
            for tensor in part.tensors:
                digest.update(self.crc(tensor).to_bytes(4, "big"))
        return digest.hexdigest()


def gguf_identity(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """The identity of a GGUF model without converting it.

    `paths` is one file (a split model is found from any of its parts) or the list of all parts in
    order, as recorded in a store manifest's `source.paths`.
    """
    one_path = isinstance(paths, (str, os.PathLike))
    return TensorChecksums().identity(open_parts(paths) if one_path else open_listed_parts(paths))
