"""Open the file(s) of a GGUF model with the `gguf` library's memory-mapped GGUFReader.

Each file's header is walked first with every count bounded by the file's size
(`mer.store.gguf_header`), since GGUFReader trusts them.

A model is one file, or a split model: parts named `NAME-00001-of-0000N.gguf` (llama.cpp's
`gguf-split` naming) whose `split.no` / `split.count` keys number them. Given any part, all parts
are found next to it, checked for completeness and opened in order.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.gguf_reader import ReaderTensor

from mer.errors import GGUFError
from mer.store.gguf_header import check_gguf_header

GGUF_MAGIC = b"GGUF"
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_NUMBER_KEY = "split.no"
SPLIT_COUNT_KEY = "split.count"


@dataclass(frozen=True)
class TensorData:
    """One tensor of a GGUF: its name, GGML type id, GGML shape (ne, fastest first) and bytes."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    path: Path
    data: np.ndarray  # uint8, exactly the tensor's bytes: a view of the memory-mapped file, or a resident copy
    offset: int = 0  # where the bytes start in the file

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(frozen=True)
class GGUFPart:
    """One opened GGUF file: its reader, header bytes (everything before tensor data) and tensors."""

    path: Path
    reader: GGUFReader
    header: np.ndarray
    tensors: tuple[TensorData, ...]

    @property
    def nbytes(self) -> int:
        return int(self.reader.data.nbytes)

    def value(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key` (a scalar, string or list), or `default` when absent."""
        field = self.reader.get_field(key)
        return default if field is None else field.contents()


def split_part_paths(path: str | os.PathLike) -> tuple[Path, ...]:
    """All parts of the model that `path` belongs to, in order; `(path,)` for a single file."""
    path = Path(path)
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return (path,)
    count = int(match["count"])
    if count < 1 or not 1 <= int(match["number"]) <= count:
        raise GGUFError(f"{path}: split file name numbers part {match['number']} of {match['count']}")
    parts = tuple(path.with_name(f"{match['stem']}-{number:05d}-of-{count:05d}.gguf") for number in range(1, count + 1))
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise GGUFError(f"{path}: split model of {count} parts is missing {', '.join(missing)}")
    return parts


def open_part(path: Path) -> GGUFPart:
    """Open one GGUF file; raise GGUFError naming the file if it is missing, foreign or truncated."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        check_gguf_header(path, data)  # bounded: GGUFReader trusts the file's counts
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError) as error:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes): {error}") from error
    tensors = tuple(_tensor_data(reader, tensor, path) for tensor in reader.tensors)
    return GGUFPart(path, reader, reader.data[: reader.data_offset], tensors)


def _tensor_data(reader: GGUFReader, tensor: ReaderTensor, path: Path) -> TensorData:
    data = reader.data[tensor.data_offset : tensor.data_offset + tensor.n_bytes]
    if data.nbytes != tensor.n_bytes:
        raise GGUFError(f"{path}: tensor {tensor.name} is cut short (truncated file of {reader.data.nbytes} bytes)")
    return TensorData(tensor.name, int(tensor.tensor_type), tuple(int(n) for n in tensor.shape), path, data,
                      int(tensor.data_offset))


def open_parts(path: str | os.PathLike) -> tuple[GGUFPart, ...]:
    """Open a model given its file (or any part of a split model) and check the split keys."""
    return open_listed_parts(split_part_paths(path))


def open_listed_parts(paths: Sequence[str | os.PathLike]) -> tuple[GGUFPart, ...]:
    """Open exactly the listed files as one model, in the order given, and check the split keys."""
    parts = tuple(open_part(Path(path)) for path in paths)
    check_split_keys(parts)
    return parts


def check_split_keys(parts: Sequence[GGUFPart]) -> None:
    """Each part's `split.no` / `split.count` must agree with its position and the number of parts."""
    for index, part in enumerate(parts):
        count = part.value(SPLIT_COUNT_KEY, 1)
        number = part.value(SPLIT_NUMBER_KEY, 0)
        if count != len(parts) or number != index:
            raise GGUFError(
                f"{part.path}: {SPLIT_COUNT_KEY}={count}, {SPLIT_NUMBER_KEY}={number}, but it is part "
                f"{index + 1} of {len(parts)} (a split model is opened by its NAME-00001-of-0000N.gguf file)"
            )
