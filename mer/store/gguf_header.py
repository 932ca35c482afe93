"""A bounded walk over a GGUF file's header before the `gguf` library parses it.

`gguf.GGUFReader` trusts the file's counts: an array of one-byte values whose count says 2^40 makes
it loop (and allocate) far past the end of the file, since every element read past the end is an
empty view that advances nothing; nested arrays recurse without limit; a tensor's dimensions are
multiplied in uint64 and silently wrap. `check_gguf_header(path, data)` walks the same layout (GGUF
versions 2 and 3, either byte order) with every count checked against the bytes left before it is
used, so its work and memory are bounded by the file's size, and raises `GGUFError` naming the
file, the field and its value:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, type: u32, value)          value: scalar | string | array
    tensor_count x (name: string, n_dims: u32, dims: n_dims x u64, type: u32, offset: u64)
    padding to `general.alignment` (32) | tensor data
    string = length u64, UTF-8 bytes (checked); array = element type u32, count u64, count x value

Tensors: at most 4 dimensions, a known GGML type, rows of whole blocks, and every tensor's bytes
(elements x type size / block size, in Python integers) inside the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mer.errors import GGUFError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2  # an array of arrays at most (llama.cpp reads none)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
SCALAR_SIZES = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
                GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
                GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
MIN_VALUE_SIZE = {**SCALAR_SIZES, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
MIN_KV_SIZE = 8 + 4 + 1  # an empty key, the type, a one-byte value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # an empty name, no dimensions, the type, the offset


class _Cursor:
    """Reads little- or big-endian integers and strings from `data`, never past its end."""

    def __init__(self, path: Path, data, byte_order: str = "<"):
        self.path, self.data, self.size, self.offset, self.order = path, data, len(data), 0, byte_order

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: truncated or corrupt GGUF file ({self.size} bytes): {message}")

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > self.size - self.offset:
            raise self.fail(f"{what} at byte {self.offset} needs {nbytes} bytes, the file ends at byte {self.size} "
                            "(truncated?)")

    def integer(self, code: str, what: str) -> int:
        size = struct.calcsize(code)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + code, self.data, self.offset)
        self.offset += size
        return value

    def skip(self, nbytes: int, what: str) -> None:
        self.need(nbytes, what)
        self.offset += nbytes

    def string(self, what: str) -> str:
        length = self.integer("Q", f"the length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        raw = bytes(self.data[self.offset : self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.offset - length} is not UTF-8 text") from None

    def count(self, what: str, min_item_size: int) -> int:
        """A count of items of at least `min_item_size` bytes each, which must fit in the bytes left."""
        value = self.integer("Q", what)
        left = self.size - self.offset
        if value * min_item_size > left:
            raise self.fail(f"{what} is {value}, but only {left} bytes are left in the file "
                            f"(at least {min_item_size} per item)")
        return value


def _value_type(cursor: _Cursor, what: str) -> GGUFValueType:
    raw = cursor.integer("I", f"the type of {what}")
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cursor.fail(f"{what} has value type {raw}, not a GGUF value type") from None


def _skip_value(cursor: _Cursor, value_type: GGUFValueType, what: str, nesting: int = 0) -> None:
    if value_type in SCALAR_SIZES:
        cursor.skip(SCALAR_SIZES[value_type], what)
    elif value_type == GGUFValueType.STRING:
        cursor.string(what)  # UTF-8, as the format requires
    else:
        if nesting >= MAX_ARRAY_NESTING:
            raise cursor.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        element_type = _value_type(cursor, f"the elements of {what}")
        count = cursor.count(f"the element count of {what}", MIN_VALUE_SIZE[element_type])
        if element_type in SCALAR_SIZES:
            cursor.skip(count * SCALAR_SIZES[element_type], what)
            return
        if element_type == GGUFValueType.STRING:
            _skip_strings(cursor, count, what)
            return
        for index in range(count):
            _skip_value(cursor, element_type, f"{what}[{index}]", nesting + 1)


def _skip_strings(cursor: _Cursor, count: int, what: str) -> None:
    """`count` strings (a tokenizer's vocabulary: 10^5 of them), each checked as `_Cursor.string` does,
    in a tight loop."""
    data, size, offset = cursor.data, cursor.size, cursor.offset
    length_of = struct.Struct(cursor.order + "Q").unpack_from
    for index in range(count):
        if offset + 8 > size:
            cursor.offset = offset
            cursor.need(8, f"the length of {what}[{index}]")
        (length,) = length_of(data, offset)
        start, offset = offset + 8, offset + 8 + length
        if offset > size:
            cursor.offset = start
            cursor.need(length, f"{what}[{index}] ({length} bytes)")
        try:
            data[start:offset].decode("utf-8")
        except UnicodeDecodeError:
            raise cursor.fail(f"{what}[{index}] at byte {start} is not UTF-8 text") from None
    cursor.offset = offset


def _read_metadata(cursor: _Cursor, count: int) -> int:
    """Walk `count` key-value pairs; the file's alignment (`general.alignment`, default 32)."""
    alignment, keys = DEFAULT_ALIGNMENT, set()
    for index in range(count):
        key = cursor.string(f"metadata key {index}")
        if key in keys:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        value_type = _value_type(cursor, f"metadata key {key!r}")
        if key == ALIGNMENT_KEY:
            if value_type != GGUFValueType.UINT32:
                raise cursor.fail(f"{ALIGNMENT_KEY} has type {value_type.name}, expected UINT32")
            alignment = cursor.integer("I", ALIGNMENT_KEY)
            if alignment == 0 or alignment & (alignment - 1):
                raise cursor.fail(f"{ALIGNMENT_KEY} is {alignment}, not a power of two")
            continue
        _skip_value(cursor, value_type, f"metadata key {key!r}")
    return alignment


def _read_tensor_info(cursor: _Cursor, index: int) -> tuple[str, int, int]:
    """One tensor's (name, offset, nbytes), its dimensions and type checked."""
    name = cursor.string(f"the name of tensor {index}")
    what = f"tensor {name!r}"
    num_dims = cursor.integer("I", f"the dimension count of {what}")
    if num_dims > MAX_DIMS:
        raise cursor.fail(f"{what} has {num_dims} dimensions, at most {MAX_DIMS}")
    dims = [cursor.integer("Q", f"dimension {axis} of {what}") for axis in range(num_dims)]
    raw_type = cursor.integer("I", f"the type of {what}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cursor.fail(f"{what} has GGML type {raw_type}, not a known type") from None
    if dims and dims[0] % block_size:
        raise cursor.fail(f"{what}: rows of {dims[0]} elements are not whole {ggml_type.name} blocks of {block_size}")
    elements = 1
    for size in dims:
        elements *= size
    offset = cursor.integer("Q", f"the data offset of {what}")
    return name, offset, elements * type_size // block_size


def check_gguf_header(path: str | Path, data) -> int:
    """Walk the header of the GGUF bytes `data` (e.g. a memory map of `path`), raising GGUFError for
    anything malformed (see the module docstring); returns the offset where the tensor data starts."""
    cursor = _Cursor(Path(path), data)
    cursor.need(4, "the magic")
    if bytes(data[:4]) != b"GGUF":
        raise cursor.fail(f"starts with {bytes(data[:4])!r}, expected b'GGUF'")
    cursor.offset = 4
    version = cursor.integer("I", "the version")
    if version & 0xFFFF == 0:  # written on a host of the other byte order
        cursor.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(f"version {version}, this mer reads GGUF versions {', '.join(map(str, SUPPORTED_VERSIONS))}")
    num_tensors = cursor.integer("Q", "the tensor count")
    num_keys = cursor.count("the metadata key count", MIN_KV_SIZE)
    if num_tensors * MIN_TENSOR_INFO_SIZE > cursor.size - cursor.offset:
        raise cursor.fail(f"the tensor count is {num_tensors}, but only {cursor.size - cursor.offset} bytes are "
                          f"left in the file (at least {MIN_TENSOR_INFO_SIZE} per tensor)")
    alignment = _read_metadata(cursor, num_keys)
    tensors, names = [], set()
    for index in range(num_tensors):
        tensor = _read_tensor_info(cursor, index)
        if tensor[0] in names:
            raise cursor.fail(f"tensor {tensor[0]!r} appears twice")
        names.add(tensor[0])
        tensors.append(tensor)
    data_start = -(-cursor.offset // alignment) * alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > cursor.size:
            raise cursor.fail(f"tensor {name!r}: its {nbytes} bytes at data offset {offset} run past the end of the "
                              f"file ({cursor.size} bytes, tensor data from byte {data_start}): absurd dimensions, "
                              "a bad offset or a truncated file")
    return data_start
