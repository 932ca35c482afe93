"""Dequantization kernels against gguf-py's reference `gguf.quants.dequantize`, bit for bit.

Blocks are built directly as bytes (gguf-py cannot quantize K-quants): arbitrary payload bytes,
with the f16 scale fields (d, dmin) drawn from random finite halves, extreme finite halves
(+-65504, subnormals, signed zeros) or any 16-bit pattern (inf and NaN included); some blocks are
all zero.

Comparison: float types (f32, f16, bf16) must match in every bit, NaN payloads included (the
widening is pure bit manipulation). Quantized types must match in every bit of every non-NaN
element (so +0.0 and -0.0 differ) and have NaN at exactly the same positions: a NaN there comes
from arithmetic on a NaN/inf scale (`inf * 0`, `NaN * q`), and which NaN payload the CPU keeps
depends on operand order, which gguf does not define; real GGUF scales are finite.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

from mer.compute.dtypes import SUPPORTED_DTYPES, dtype_by_name
from mer.errors import ShapeError, UnsupportedDTypeError
from mer.quant.dequant import (
    ROW_DEQUANTIZERS,
    dequantize,
    dequantize_row_q4_0,
    dequantize_row_q4_k,
)

FLOAT_DTYPES = ("f32", "f16", "bf16")
QUANTIZED_DTYPES = ("q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "mxfp4")

# Byte offsets of the f16 fields inside one block (for f16 itself: the element).
F16_FIELD_OFFSETS = {
    "f32": (),
    "f16": (0,),
    "bf16": (),
    "q4_0": (0,),
    "q8_0": (0,),
    "q4_k": (0, 2),
    "q5_k": (0, 2),
    "q6_k": (208,),
    "mxfp4": (),  # its scale is one E8M0 byte: random bytes cover all 256
}

EXTREME_HALVES = (65504.0, -65504.0, 2.0**-24, -(2.0**-24), 1023 * 2.0**-24, 2.0**-14, 0.0, -0.0)


def _half_bits(value: float) -> int:
    return int(np.float16(value).view(np.uint16))


def _is_finite_half(bits: int) -> bool:
    return (bits & 0x7C00) != 0x7C00


half_bits = st.one_of(
    st.sampled_from([_half_bits(value) for value in EXTREME_HALVES]),
    st.integers(0, 0xFFFF).filter(_is_finite_half),
    st.integers(0, 0xFFFF),
)


@st.composite
def gguf_block(draw: st.DrawFn, dtype: str) -> bytes:
    """One block of `dtype`: all zero, or random bytes with drawn f16 fields."""
    type_size = dtype_by_name(dtype).type_size
    if draw(st.integers(0, 9)) == 0:
        return bytes(type_size)
    block = bytearray(draw(st.binary(min_size=type_size, max_size=type_size)))
    for offset in F16_FIELD_OFFSETS[dtype]:
        block[offset : offset + 2] = draw(half_bits).to_bytes(2, "little")
    return bytes(block)


@st.composite
def gguf_tensor(draw: st.DrawFn, dtype: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Raw bytes (rows x row bytes) and the element shape of a small tensor of `dtype`."""
    dtype_info = dtype_by_name(dtype)
    max_blocks = 64 if dtype_info.block_size == 1 else 4
    leading = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    num_blocks = draw(st.integers(1, max_blocks))
    num_rows = int(np.prod(leading, dtype=np.int64))
    blocks = draw(st.lists(gguf_block(dtype), min_size=num_rows * num_blocks,
                           max_size=num_rows * num_blocks))
    data = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(num_rows, -1)
    return data, (*leading, num_blocks * dtype_info.block_size)


def gguf_reference(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    ggml_type: GGMLQuantizationType = dtype_by_name(dtype).ggml_type
    return np.asarray(gguf_quants.dequantize(data, ggml_type), dtype=np.float32).reshape(shape)


def assert_bit_identical(actual: np.ndarray, expected: np.ndarray, *, nan_payloads: bool) -> None:
    """Same shape and float32 bits; with `nan_payloads=False` NaNs need only the same positions."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    actual_nan, expected_nan = np.isnan(actual), np.isnan(expected)
    np.testing.assert_array_equal(actual_nan, expected_nan, err_msg="NaN positions differ")
    compared = np.ones_like(actual_nan) if nan_payloads else ~actual_nan
    actual_bits, expected_bits = actual.view(np.uint32), expected.view(np.uint32)
    mismatch = np.flatnonzero((actual_bits != expected_bits) & compared)
    assert mismatch.size == 0, (
        f"{mismatch.size} elements differ, first at flat index {mismatch[0]}: "
        f"{actual.reshape(-1)[mismatch[0]]!r} vs gguf {expected.reshape(-1)[mismatch[0]]!r}"
    )


def assert_matches_gguf(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> None:
    with np.errstate(invalid="ignore", over="ignore"):
        expected = gguf_reference(data, dtype, shape)
    assert_bit_identical(dequantize(data, dtype, shape), expected,
                         nan_payloads=dtype in FLOAT_DTYPES)


def test_every_supported_dtype_has_a_row_dequantizer() -> None:
    assert set(ROW_DEQUANTIZERS) == set(SUPPORTED_DTYPES) == {*FLOAT_DTYPES, *QUANTIZED_DTYPES}


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, *QUANTIZED_DTYPES])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_blocks_match_gguf_bit_for_bit(dtype: str, data: st.DataObject) -> None:
    raw, shape = data.draw(gguf_tensor(dtype))
    assert_matches_gguf(raw, dtype, shape)


@pytest.mark.parametrize("dtype", QUANTIZED_DTYPES)
@pytest.mark.parametrize("half", EXTREME_HALVES)
def test_extreme_scales_in_every_block_match_gguf(dtype: str, half: float) -> None:
    dtype_info = dtype_by_name(dtype)
    rng = np.random.default_rng(1234)
    num_rows, num_blocks = 3, 5
    blocks = rng.integers(
        0, 256, size=(num_rows * num_blocks, dtype_info.type_size), dtype=np.uint8
    )
    for offset in F16_FIELD_OFFSETS[dtype]:
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(half).tobytes(), dtype=np.uint8)
    raw = blocks.reshape(num_rows, -1)
    shape = (num_rows, num_blocks * dtype_info.block_size)
    assert_matches_gguf(raw, dtype, shape)
    assert np.isfinite(dequantize(raw, dtype, shape)).all()


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, *QUANTIZED_DTYPES])
def test_all_zero_bytes_give_zeros(dtype: str) -> None:
    """Zeros; their sign (q4_0 and q6_k give -0.0: 0 * (q - offset)) is checked against gguf."""
    dtype_info = dtype_by_name(dtype)
    shape = (2, 2 * max(dtype_info.block_size, 32))
    raw = np.zeros(dtype_info.matrix_nbytes(*shape), dtype=np.uint8)
    result = dequantize(raw, dtype, shape)
    assert_matches_gguf(raw, dtype, shape)
    assert (result == 0).all()


def test_q4_0_block_values_by_hand() -> None:
    """d = 0.5; byte i holds nibble i % 16 low and 15 - i % 16 high: values 0.5 * (q - 8)."""
    nibbles = np.arange(16, dtype=np.uint8)
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8),
                            nibbles | ((15 - nibbles) << 4)])
    expected = 0.5 * (np.concatenate([nibbles, 15 - nibbles]).astype(np.float32) - 8)
    np.testing.assert_array_equal(dequantize(block, "q4_0", (32,)), expected)


def test_q8_0_round_trip_from_gguf_quantize_is_within_half_a_step() -> None:
    values = np.random.default_rng(7).standard_normal((4, 64)).astype(np.float32)
    raw = gguf_quants.quantize(values, GGMLQuantizationType.Q8_0)
    step = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    error = np.abs(dequantize(raw, "q8_0", values.shape).reshape(-1, 32) - values.reshape(-1, 32))
    # half a step, plus up to 127 times the f16 rounding error of d (relative 2**-11)
    assert (error <= step * (0.5 + 127 * 2.0**-11)).all()


def test_float_types_convert_exactly() -> None:
    values = np.array([1.0, -2.5, 65504.0, 2.0**-24, -0.0, np.inf, -np.inf], dtype=np.float16)
    np.testing.assert_array_equal(
        dequantize(values.view(np.uint8), "f16", values.shape), values.astype(np.float32))
    # bf16-representable float32s: pi-ish, huge negative, subnormal, -0.0, a NaN with payload
    wide = np.array([0x40490000, 0xFE960000, 0x00010000, 0x80000000, 0x7FC10000],
                    dtype=np.uint32).view(np.float32)
    top_halves = (wide.view(np.uint32) >> 16).astype(np.uint16)
    assert_bit_identical(dequantize(top_halves.view(np.uint8), "bf16", wide.shape), wide,
                         nan_payloads=True)
    assert_bit_identical(dequantize(wide.view(np.uint8), "f32", wide.shape), wide,
                         nan_payloads=True)


@njit(cache=True)
def _dequantize_rows_from_numba(matrix_bytes: np.ndarray, out: np.ndarray) -> None:
    for row in range(out.shape[0]):
        dequantize_row_q4_k(matrix_bytes[row], out[row])


def test_row_dequantizer_is_callable_from_numba_per_row() -> None:
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(6, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.frombuffer(np.float16([0.01, 0.002]).tobytes(), dtype=np.uint8)
    raw = blocks.reshape(3, 2 * 144)
    out = np.empty((3, 512), dtype=np.float32)
    _dequantize_rows_from_numba(raw, out)
    assert_bit_identical(out, gguf_reference(raw, "q4_k", (3, 512)), nan_payloads=False)


def test_row_dequantizer_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in blocks"):
        dequantize_row_q4_0(np.zeros(18, dtype=np.uint8), np.empty(64, dtype=np.float32))
    with pytest.raises(ValueError, match="differ in blocks"):
        dequantize_row_q4_0(np.zeros(36, dtype=np.uint8), np.empty(40, dtype=np.float32))


def test_flat_and_non_contiguous_data_are_accepted() -> None:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(4, 2 * 34), dtype=np.uint8)
    raw.reshape(-1, 34)[:, 0:2] = np.frombuffer(np.float16(0.25).tobytes(), dtype=np.uint8)
    expected = dequantize(raw, "q8_0", (4, 64))
    np.testing.assert_array_equal(dequantize(raw.reshape(-1), "q8_0", (2, 2, 64)),
                                  expected.reshape(2, 2, 64))
    wide = np.zeros((4, 2 * 68), dtype=np.uint8)
    wide[:, ::2] = raw
    np.testing.assert_array_equal(dequantize(wide[:, ::2], "q8_0", (4, 64)), expected)


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(UnsupportedDTypeError, match="'q4_1'.*supported: f32"):
        dequantize(np.zeros(20, dtype=np.uint8), "q4_1", (32,))


def test_non_uint8_data_is_rejected() -> None:
    with pytest.raises(UnsupportedDTypeError, match="uint8.*got float32"):
        dequantize(np.zeros(32, dtype=np.float32), "f32", (32,))


def test_wrong_byte_count_names_both_sizes() -> None:
    with pytest.raises(ShapeError, match=r"shape \(2, 64\) needs 72 bytes .* got 54"):
        dequantize(np.zeros(54, dtype=np.uint8), "q4_0", (2, 64))


def test_columns_not_a_multiple_of_the_block_are_rejected() -> None:
    with pytest.raises(ShapeError, match="48 elements .* q4_0 block size 32"):
        dequantize(np.zeros(27, dtype=np.uint8), "q4_0", (48,))


@pytest.mark.parametrize("shape", [(), (0, 32), (2, -32), (True, 32), (2.0, 32)])
def test_malformed_shapes_are_rejected(shape: tuple) -> None:
    with pytest.raises(ShapeError, match="positive integers"):
        dequantize(np.zeros(36, dtype=np.uint8), "q4_0", shape)
