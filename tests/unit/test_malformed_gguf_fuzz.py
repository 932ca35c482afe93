"""Malformed GGUFs, fuzzed with hypothesis: truncation, a wrong magic, any header integer (lengths, value
types, element counts, tensor counts, dimensions, GGML types, data offsets) set to an absurd or
small value, and random bytes in the header, of a tiny MoE model written with the `gguf` library.

Every case goes through what `convert` and generation read: the GGUF's parts and experts
(`read_gguf_source`), the tokenizer, the model (`MoEModel.load`: hyper-parameters and dense
weights) and, when those accept it, a conversion (`convert_gguf`). Each either succeeds or raises
one of mer's errors, on one line naming the file; never another exception, never more than
`MEMORY_LIMIT` of Python/numpy allocations (tracemalloc), never longer than 60 s (`tests.support.resource_bounds`).
Found by this fuzzing and fixed (each also a test below): an array of one-byte values whose count
says 2^40 made gguf's reader loop for 20 s and allocate gigabytes (`mer.store.gguf_header` bounds
every count now); a string value that is not UTF-8 was a `UnicodeDecodeError`; `block_count` 2^31
made loading the model list 2^31 blocks (a hang).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from hypothesis import strategies as st

from mer.errors import MerError
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from mer.store.convert import convert_gguf
from mer.store.gguf_source import read_gguf_source
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.resource_bounds import bounded, check_fuzz_case, fuzz_test

MEMORY_LIMIT = 64 * 2**20
ABSURD = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 255, 4096, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
          2**40, 2**62, 2**63, 2**64 - 1]


class Model(NamedTuple):
    """The tiny model's bytes, the (offset, width) of every structural integer of its header, the header's
    size, the offsets of each metadata array's element type and count, and the (offset, width) of each
    integer metadata value."""

    content: bytes
    integers: list[tuple[int, int]]
    header_size: int
    arrays: list[tuple[int, int]]
    values: list[tuple[int, int]]

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing case
        return f"Model(a tiny qwen3moe GGUF of {len(self.content)} bytes)"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    path = write_tiny_moe_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", arch="qwen3moe", dtypes=("q8_0",) * 3,
                               n_layers=2, n_experts=4, top_k=2, d_model=64, d_ff=64, vocab_size=300,
                               tokenizer="bpe", seed=3).path
    reader = GGUFReader(path)
    values = [(entry.parts[3].ctypes.data - reader.data.ctypes.data, entry.parts[3].nbytes)
              for entry in list(reader.fields.values())[3:]
              if len(entry.parts) == 4 and entry.parts[3].dtype.kind in "ui" and entry.parts[3].nbytes in (4, 8)]
    return Model(path.read_bytes(), header_integers(reader), reader.data_offset, array_headers(reader), values)


def array_headers(reader: GGUFReader) -> list[tuple[int, int]]:
    base = reader.data.ctypes.data
    return [(field.parts[3].ctypes.data - base, field.parts[4].ctypes.data - base)
            for field in reader.fields.values() if field.types and field.types[0] == GGUFValueType.ARRAY]


def header_integers(reader: GGUFReader) -> list[tuple[int, int]]:
    """(offset, width) of the header's structural integers: magic, version, counts; each key's length,
    value type, integer value, and for an array its element type, count and first string lengths;
    each tensor's name length, dimension count, dimensions, GGML type and data offset."""
    base = reader.data.ctypes.data
    integers = {(0, 4), (4, 4), (8, 8), (16, 8)}
    for field in list(reader.fields.values())[3:]:  # after GGUF.version, tensor_count, kv_count
        parts = field.parts[:2 + 1 + 2 + 2 * 3] if field.types[0] == GGUFValueType.ARRAY else field.parts[:4]
        integers.update((part.ctypes.data - base, part.nbytes) for part in parts
                        if part.dtype.kind in "ui" and part.nbytes in (4, 8))
    for tensor in reader.tensors:
        name_length, _, num_dims, dims, ggml_type, offset = tensor.field.parts
        start = dims.ctypes.data - base
        integers.update([(name_length.ctypes.data - base, 8), (num_dims.ctypes.data - base, 4),
                         (ggml_type.ctypes.data - base, 4), (offset.ctypes.data - base, 8)])
        integers.update((start + 8 * axis, 8) for axis in range(len(dims)))
    return sorted(integers)


def set_integer(data: bytearray, offset: int, width: int, value: int) -> None:
    struct.pack_into("<I" if width == 4 else "<Q", data, offset, value % 2 ** (8 * width))


@st.composite
def malformed(draw, model) -> tuple[str, bytes]:
    original, integers, header_size, arrays = model.content, model.integers, model.header_size, model.arrays
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncated", "integer", "integer", "integers", "header bytes", "magic", "array",
                                 "metadata value", "metadata value"]))
    if kind == "truncated":
        return kind, bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "magic":
        data[:4] = draw(st.binary(min_size=4, max_size=4).filter(lambda magic: magic != b"GGUF"))
    elif kind == "array":  # another element type (any GGUF value type, or none) and another count
        type_offset, count_offset = draw(st.sampled_from(arrays))
        set_integer(data, type_offset, 4, draw(st.one_of(st.sampled_from([0, 1, 7]), st.integers(0, 13))))  # 1-byte first
        set_integer(data, count_offset, 8, draw(st.one_of(st.sampled_from(ABSURD), st.integers(0, 2**64 - 1))))
    elif kind == "header bytes":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, header_size - 1))] = draw(st.integers(0, 255))
    else:
        for _ in range(draw(st.integers(2, 4)) if kind == "integers" else 1):
            offset, width = draw(st.sampled_from(model.values if kind == "metadata value" else integers))
            value = draw(st.one_of(st.sampled_from(ABSURD), st.integers(0, 2 ** (8 * width) - 1)))
            set_integer(data, offset, width, value)
    return kind, bytes(data)


def check_mer_error(error: BaseException, path: Path) -> None:
    assert isinstance(error, MerError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert str(path) in message and "\n" not in message, message


def read_all_ways(path: Path, out: Path) -> str:
    """What `convert` and generation do with the file, up to the first error; 'ok' or the error."""
    try:
        source = read_gguf_source(path)
        load_tokenizer(source.parts[0])
        MoEModel.load(path)
        convert_gguf(path, out)
    except Exception as error:  # noqa: BLE001 (checked below: only mer's errors are allowed)
        check_mer_error(error, path)
        return type(error).__name__
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return "ok"


def test_the_unmodified_model_reads_and_converts(model, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(model.content)
    assert read_all_ways(path, tmp_path / "store") == "ok"


@fuzz_test(max_examples=80)  # slow: 5-30 s on two busy cores
def test_a_malformed_gguf_gives_a_clear_error_with_bounded_memory(model, tmp_path, data):
    kind, content = data.draw(malformed(model))
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    check_fuzz_case(kind, lambda: read_all_ways(path, tmp_path / "store"), MEMORY_LIMIT)


@pytest.mark.parametrize("value_type", [0, 1, 7])  # uint8, int8, bool: one byte per element
def test_a_huge_count_of_one_byte_elements_is_refused_at_once(model, tmp_path, value_type):
    """The case the fuzzing found: gguf's reader walked 2^40 empty elements past the end of the file."""
    data = bytearray(model.content)
    reader = GGUFReader(_written(tmp_path / "base.gguf", model.content))
    field = next(field for field in reader.fields.values()
                 if len(field.parts) > 4 and field.parts[3].dtype == np.uint32 and field.parts[4].dtype == np.uint64)
    base = reader.data.ctypes.data
    set_integer(data, field.parts[3].ctypes.data - base, 4, value_type)  # the element type
    set_integer(data, field.parts[4].ctypes.data - base, 8, 2**40)  # the element count
    path = _written(tmp_path / "huge.gguf", bytes(data))
    with bounded(20) as peak:
        with pytest.raises(MerError) as caught:
            read_gguf_source(path)
    check_mer_error(caught.value, path)
    assert f"the element count of metadata key {field.name!r} is 1099511627776" in str(caught.value)
    assert peak() < MEMORY_LIMIT


def _written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_a_string_that_is_not_utf8_is_named(model, tmp_path):
    """Found by the fuzzing: gguf decodes strings only when asked, so a bad byte in a value was a
    UnicodeDecodeError deep in the model's loading."""
    data = bytearray(model.content)
    value = data.index(b"qwen3moe")  # general.architecture's value, the first string value
    data[value] = 0x80
    path = _written(tmp_path / "bad-text.gguf", bytes(data))
    with pytest.raises(MerError) as caught:
        read_gguf_source(path)
    check_mer_error(caught.value, path)
    assert f"metadata key 'general.architecture' at byte {value} is not UTF-8 text" in str(caught.value)


def test_an_absurd_block_count_is_refused_before_listing_the_blocks(model, tmp_path):
    """Found by the fuzzing: `block_count` 2^31 made loading the model list 2^31 blocks."""
    reader = GGUFReader(_written(tmp_path / "base.gguf", model.content))
    part = reader.fields["qwen3moe.block_count"].parts[3]
    data = bytearray(model.content)
    set_integer(data, part.ctypes.data - reader.data.ctypes.data, 4, 2**31)
    path = _written(tmp_path / "blocks.gguf", bytes(data))
    with bounded(20) as peak:
        with pytest.raises(MerError) as caught:
            MoEModel.load(path)
    check_mer_error(caught.value, path)
    assert ("qwen3moe.block_count 2147483648 with 0 leading dense blocks makes 2147483648 MoE blocks, but expert "
            "tensors are in 2 blocks") in str(caught.value)
    assert peak() < MEMORY_LIMIT
