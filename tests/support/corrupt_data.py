"""Damage stores and GGUFs the way a failing disk or a bad model file would, for the integrity tests.

`flip_byte` changes one bit of an expert payload on disk (the manifest keeps the old checksum, as
after bit rot); `write_nan_scale` puts an f16 NaN in the scale of an expert's first block and
records the new checksum (the store is then consistent, as the conversion of a GGUF holding that NaN
would write it); `write_nan_in_gguf_tensor` does the same inside a GGUF file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from mer.store.checksum import payload_checksum
from mer.store.manifest import Manifest

NAN_F16 = np.array([np.nan], np.float16).tobytes()


def payload_place(store: Path, expert_id: int) -> tuple[Path, int, int]:
    """(layer file, offset of the expert's payload in it, payload size)."""
    manifest = Manifest.load(store)
    entry = manifest.expert(expert_id)
    layer = manifest.layers[entry.moe_layer]
    return Path(store) / layer.file, entry.offset, layer.format.payload_nbytes


def flip_byte(store: Path, expert_id: int, byte: int = 1000) -> tuple[Path, int]:
    """Flip the lowest bit of byte `byte` of the expert's payload; returns (file, payload offset)."""
    path, offset, _ = payload_place(store, expert_id)
    with open(path, "r+b") as file:
        file.seek(offset + byte)
        value = file.read(1)[0]
        file.seek(offset + byte)
        file.write(bytes([value ^ 1]))
    return path, offset


def write_nan_scale(store: Path, expert_id: int) -> None:
    """NaN as the f16 scale of the expert's first block (q4_0, q8_0: bytes 0-1 of a block, native layout),
    with the manifest's checksum updated to match."""
    path, offset, nbytes = payload_place(store, expert_id)
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(NAN_F16)
        file.seek(offset)
        payload = file.read(nbytes)
    manifest = Manifest.load(store)
    experts = list(manifest.experts)
    experts[expert_id] = dataclasses.replace(experts[expert_id], checksum=payload_checksum(payload))
    dataclasses.replace(manifest, experts=tuple(experts)).save(store)


def write_nan_in_gguf_tensor(path: Path, tensor_name: str, byte: int) -> None:
    """Write an f16 NaN at byte `byte` of a tensor's data in a GGUF file (a block's scale, for block types)."""
    (tensor,) = [tensor for tensor in GGUFReader(path).tensors if tensor.name == tensor_name]
    with open(path, "r+b") as file:
        file.seek(int(tensor.data_offset) + byte)
        file.write(NAN_F16)


def write_nan_f32_in_gguf_tensor(path: Path, tensor_name: str, index: int = 0) -> None:
    """Write an f32 NaN as element `index` of an f32 tensor in a GGUF file."""
    (tensor,) = [tensor for tensor in GGUFReader(path).tensors if tensor.name == tensor_name]
    with open(path, "r+b") as file:
        file.seek(int(tensor.data_offset) + 4 * index)
        file.write(np.array([np.nan], np.float32).tobytes())
