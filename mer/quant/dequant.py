"""Dequantization of raw GGUF weight bytes to float32, bit-identical to `gguf.quants.dequantize`.

Two levels:

- `dequantize_row_<dtype>(source, destination)`: numba (nopython, cached) kernels that turn the
  raw bytes of one or more whole GGUF blocks (`source`, uint8[:]) into their float32 elements
  (`destination`, float32[:], `num_blocks * block_size` long). They allocate nothing and can be
  called from other numba code, e.g. per row from a matmul kernel. A size mismatch raises
  ValueError (a programming error, not user input).
- `dequantize(data, dtype, shape)`: the validated Python entry point for a whole tensor.

Each kernel performs the same float32 operations, in the same order, as gguf-py's numpy code, so
the results agree bit for bit (for K-quants: `(d * scale) * q - (dmin * min)`). Every product
there is exact in float32 (an 11-bit f16 mantissa times a 6-bit scale and a 5-bit quant, or a
7-bit int8 scale and a 5-bit quant, stays within 24 bits and far from overflow or underflow), so
the one rounding is the final subtraction, and even a fused multiply-add could not change a
result. f16 and bf16 values are widened exactly by bit manipulation, NaN payloads included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mer.compute.dtypes import dtype_by_name
from mer.errors import ShapeError, UnsupportedDTypeError

_SUBNORMAL_F16_UNIT = np.float32(2.0**-24)  # value of the f16 mantissa's lowest bit at exponent 0
_F16_TO_F32_EXPONENT_BIAS = np.uint32((127 - 15) << 23)


@intrinsic
def _float32_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        as_uint32 = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(as_uint32, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_from_float32(typingctx, value):  # type: ignore[no-untyped-def]
    """The IEEE-754 bit pattern of a float32, as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@njit(cache=True)
def _float32_from_float16_bits(half: int) -> np.float32:
    """Exact float32 value of the f16 with bit pattern `half` (subnormals, inf, NaN payloads)."""
    sign = np.uint32(half & 0x8000) << np.uint32(16)
    magnitude = np.uint32(half & 0x7FFF)
    if magnitude >= 0x7C00:  # inf or NaN: all-ones exponent, mantissa moved up
        bits = np.uint32(0x7F800000) | ((magnitude & np.uint32(0x3FF)) << np.uint32(13))
    elif magnitude >= 0x0400:  # normal: rebias the exponent
        bits = (magnitude << np.uint32(13)) + _F16_TO_F32_EXPONENT_BIAS
    else:  # zero or subnormal: an exact float32 product
        bits = _bits_from_float32(np.float32(magnitude) * _SUBNORMAL_F16_UNIT)
    return _float32_from_bits(sign | bits)


@njit(cache=True)
def _read_float16(source: np.ndarray, offset: int) -> np.float32:
    """The little-endian f16 at `source[offset:offset + 2]`, widened to float32."""
    half = np.int64(source[offset]) | (np.int64(source[offset + 1]) << 8)
    return _float32_from_float16_bits(half)


@njit(cache=True)
def _signed_byte(byte: int) -> int:
    """A uint8 reinterpreted as int8."""
    value = np.int64(byte)
    return value - ((value & 0x80) << 1)


@njit(cache=True)
def _num_blocks(
    source: np.ndarray, destination: np.ndarray, block_size: int, type_size: int
) -> int:
    """Blocks in `destination`; ValueError unless both arrays hold that many whole blocks."""
    num_blocks = destination.size // block_size
    if destination.size != num_blocks * block_size or source.size != num_blocks * type_size:
        raise ValueError("dequantize_row: source bytes and destination length differ in blocks")
    return num_blocks


@njit(cache=True)
def dequantize_row_f32(source: np.ndarray, destination: np.ndarray) -> None:
    """Little-endian float32 bytes to float32 (a bit copy)."""
    num_values = _num_blocks(source, destination, 1, 4)
    for index in range(num_values):
        at = 4 * index
        bits = (
            np.int64(source[at])
            | (np.int64(source[at + 1]) << 8)
            | (np.int64(source[at + 2]) << 16)
            | (np.int64(source[at + 3]) << 24)
        )
        destination[index] = _float32_from_bits(bits)


@njit(cache=True)
def dequantize_row_f16(source: np.ndarray, destination: np.ndarray) -> None:
    """Little-endian IEEE half-precision bytes to float32 (exact)."""
    num_values = _num_blocks(source, destination, 1, 2)
    for index in range(num_values):
        destination[index] = _read_float16(source, 2 * index)


@njit(cache=True)
def dequantize_row_bf16(source: np.ndarray, destination: np.ndarray) -> None:
    """Little-endian bfloat16 bytes to float32: each value is the top half of a float32."""
    num_values = _num_blocks(source, destination, 1, 2)
    for index in range(num_values):
        at = 2 * index
        bits = (np.int64(source[at]) << 16) | (np.int64(source[at + 1]) << 24)
        destination[index] = _float32_from_bits(bits)


@njit(cache=True)
def dequantize_row_q4_0(source: np.ndarray, destination: np.ndarray) -> None:
    """Q4_0 blocks (f16 d, 16 bytes of nibbles; low nibbles first) to `d * (q - 8)`."""
    num_blocks = _num_blocks(source, destination, 32, 18)
    for block in range(num_blocks):
        at = 18 * block
        out = 32 * block
        scale = _read_float16(source, at)
        for index in range(16):
            byte = np.int64(source[at + 2 + index])
            destination[out + index] = scale * np.float32((byte & 0x0F) - 8)
            destination[out + 16 + index] = scale * np.float32((byte >> 4) - 8)


@njit(cache=True)
def dequantize_row_q8_0(source: np.ndarray, destination: np.ndarray) -> None:
    """Q8_0 blocks (f16 d, 32 int8) to `q * d`."""
    num_blocks = _num_blocks(source, destination, 32, 34)
    for block in range(num_blocks):
        at = 34 * block
        out = 32 * block
        scale = _read_float16(source, at)
        for index in range(32):
            destination[out + index] = np.float32(_signed_byte(source[at + 2 + index])) * scale


@njit(cache=True)
def _k_scale_and_min(source: np.ndarray, scales_at: int, sub_block: int) -> tuple[int, int]:
    """The 6-bit scale and min of one of the 8 sub-blocks, from the 12 packed bytes of Q4_K/Q5_K.

    Bytes 0-3 hold the scales of sub-blocks 0-3 (and in their top 2 bits the high bits of the
    scales 4-7), bytes 4-7 the mins likewise, bytes 8-11 the low 4 bits of scales/mins 4-7.
    """
    if sub_block < 4:
        scale = np.int64(source[scales_at + sub_block]) & 0x3F
        minimum = np.int64(source[scales_at + 4 + sub_block]) & 0x3F
    else:
        packed = np.int64(source[scales_at + 4 + sub_block])
        scale = (packed & 0x0F) | ((np.int64(source[scales_at + sub_block - 4]) >> 6) << 4)
        minimum = (packed >> 4) | ((np.int64(source[scales_at + sub_block]) >> 6) << 4)
    return scale, minimum


@njit(cache=True)
def _k_sub_block_factors(
    source: np.ndarray, block_at: int, sub_block: int
) -> tuple[np.float32, np.float32]:
    """(d * scale, dmin * min) of one sub-block of a Q4_K/Q5_K block, each rounded to float32."""
    scale, minimum = _k_scale_and_min(source, block_at + 4, sub_block)
    d = _read_float16(source, block_at)
    dmin = _read_float16(source, block_at + 2)
    return d * np.float32(scale), dmin * np.float32(minimum)


@njit(cache=True)
def dequantize_row_q4_k(source: np.ndarray, destination: np.ndarray) -> None:
    """Q4_K super-blocks (d, dmin, 12 scale bytes, 128 nibble bytes) to `d*sc*q - dmin*m`."""
    num_blocks = _num_blocks(source, destination, 256, 144)
    for block in range(num_blocks):
        at = 144 * block
        quants_at = at + 16
        for chunk in range(4):  # 32 bytes: low nibbles are sub-block 2c, high nibbles 2c + 1
            low_factor, low_offset = _k_sub_block_factors(source, at, 2 * chunk)
            high_factor, high_offset = _k_sub_block_factors(source, at, 2 * chunk + 1)
            out = 256 * block + 64 * chunk
            for index in range(32):
                byte = np.int64(source[quants_at + 32 * chunk + index])
                destination[out + index] = low_factor * np.float32(byte & 0x0F) - low_offset
                destination[out + 32 + index] = high_factor * np.float32(byte >> 4) - high_offset


@njit(cache=True)
def dequantize_row_q5_k(source: np.ndarray, destination: np.ndarray) -> None:
    """Q5_K super-blocks (d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes)."""
    num_blocks = _num_blocks(source, destination, 256, 176)
    for block in range(num_blocks):
        at = 176 * block
        high_bits_at = at + 16
        quants_at = at + 48
        for chunk in range(4):
            low_sub, high_sub = 2 * chunk, 2 * chunk + 1
            low_factor, low_offset = _k_sub_block_factors(source, at, low_sub)
            high_factor, high_offset = _k_sub_block_factors(source, at, high_sub)
            out = 256 * block + 64 * chunk
            for index in range(32):
                byte = np.int64(source[quants_at + 32 * chunk + index])
                high_bits = np.int64(source[high_bits_at + index])
                low_q = (byte & 0x0F) | (((high_bits >> low_sub) & 1) << 4)
                high_q = (byte >> 4) | (((high_bits >> high_sub) & 1) << 4)
                destination[out + index] = low_factor * np.float32(low_q) - low_offset
                destination[out + 32 + index] = high_factor * np.float32(high_q) - high_offset


@njit(cache=True)
def dequantize_row_q6_k(source: np.ndarray, destination: np.ndarray) -> None:
    """Q6_K super-blocks (128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, f16 d).

    Each 128-element half uses 64 low bytes, 32 high bytes and 8 scales (one per 16 elements);
    element `32 * k + i` of a half takes nibble `k // 2` of low byte `32 * (k % 2) + i` and
    bits `2k, 2k + 1` of high byte `i`; the value is `(d * scale) * (q - 32)`.
    """
    num_blocks = _num_blocks(source, destination, 256, 210)
    for block in range(num_blocks):
        at = 210 * block
        d = _read_float16(source, at + 208)
        for half in range(2):
            low_at = at + 64 * half
            high_at = at + 128 + 32 * half
            scales_at = at + 192 + 8 * half
            for group in range(2):  # elements 16 * group ... + 15 of each 32-run share a scale
                factors = (
                    d * np.float32(_signed_byte(source[scales_at + group])),
                    d * np.float32(_signed_byte(source[scales_at + group + 2])),
                    d * np.float32(_signed_byte(source[scales_at + group + 4])),
                    d * np.float32(_signed_byte(source[scales_at + group + 6])),
                )
                out = 256 * block + 128 * half + 16 * group
                for offset in range(16):
                    index = 16 * group + offset
                    first = np.int64(source[low_at + index])
                    second = np.int64(source[low_at + 32 + index])
                    high = np.int64(source[high_at + index])
                    q0 = ((first & 0x0F) | ((high & 3) << 4)) - 32
                    q1 = ((second & 0x0F) | (((high >> 2) & 3) << 4)) - 32
                    q2 = ((first >> 4) | (((high >> 4) & 3) << 4)) - 32
                    q3 = ((second >> 4) | ((high >> 6) << 4)) - 32
                    destination[out + offset] = factors[0] * np.float32(q0)
                    destination[out + 32 + offset] = factors[1] * np.float32(q1)
                    destination[out + 64 + offset] = factors[2] * np.float32(q2)
                    destination[out + 96 + offset] = factors[3] * np.float32(q3)


MXFP4_DOUBLED_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
"""The 16 E2M1 codes' values doubled (all integers): code `c` means `MXFP4_DOUBLED_VALUES[c] / 2`."""


@njit(cache=True)
def e8m0_half_scale(exponent: int) -> np.float32:
    """Half the value of an E8M0 scale byte, `2^(exponent - 128)`, as ggml computes it: the bits of
    a float32 power of two (a subnormal for exponent 0 and 1; 255 is 2^127, not NaN)."""
    if exponent < 2:
        return _float32_from_bits(np.uint32(0x00200000) << np.uint32(exponent))
    return _float32_from_bits(np.uint32(exponent - 1) << np.uint32(23))


@njit(cache=True)
def dequantize_row_mxfp4(source: np.ndarray, destination: np.ndarray) -> None:
    """MXFP4 blocks (E8M0 scale byte, 16 bytes of E2M1 codes; low nibbles first) to
    `2^(e - 128) * doubled_value(code)` (the doubled table times half the scale, as ggml)."""
    num_blocks = _num_blocks(source, destination, 32, 17)
    for block in range(num_blocks):
        at = 17 * block
        out = 32 * block
        scale = e8m0_half_scale(np.int64(source[at]))
        for index in range(16):
            byte = np.int64(source[at + 1 + index])
            destination[out + index] = scale * np.float32(MXFP4_DOUBLED_VALUES[byte & 0x0F])
            destination[out + 16 + index] = scale * np.float32(MXFP4_DOUBLED_VALUES[byte >> 4])


ROW_DEQUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "f32": dequantize_row_f32,
    "f16": dequantize_row_f16,
    "bf16": dequantize_row_bf16,
    "q4_0": dequantize_row_q4_0,
    "q8_0": dequantize_row_q8_0,
    "q4_k": dequantize_row_q4_k,
    "q5_k": dequantize_row_q5_k,
    "q6_k": dequantize_row_q6_k,
    "mxfp4": dequantize_row_mxfp4,
}


def _validated_shape(shape: Sequence[int], dtype: str) -> tuple[int, ...]:
    dims = tuple(shape)
    if not dims or not all(isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim > 0
                           for dim in dims):
        raise ShapeError(f"{dtype} tensor shape {dims} must be one or more positive integers")
    return tuple(int(dim) for dim in dims)


def dequantize(data: np.ndarray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Dequantize raw GGUF bytes of a `dtype` tensor to a float32 array of `shape`.

    `data` is a uint8 array of any shape holding the tensor's bytes in GGUF order; `shape[-1]` is
    the blocked (contiguous, GGML ne0) dimension and must be a multiple of the dtype's block size.
    Raises UnsupportedDTypeError for a dtype mer does not support or non-uint8 data, ShapeError
    when the byte count does not match the shape.
    """
    dtype_info = dtype_by_name(dtype)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise UnsupportedDTypeError(
            f"raw {dtype_info.name} data must be a uint8 numpy array of GGUF bytes, got {found} "
            "(use .view(np.uint8) on the raw buffer)"
        )
    dims = _validated_shape(shape, dtype_info.name)
    num_rows = math.prod(dims[:-1])
    expected_nbytes = num_rows * dtype_info.row_nbytes(dims[-1])
    if data.size != expected_nbytes:
        raise ShapeError(
            f"{dtype_info.name} tensor of shape {dims} needs {expected_nbytes} bytes "
            f"({num_rows} rows of {dims[-1] // dtype_info.block_size} blocks x "
            f"{dtype_info.type_size} bytes), got {data.size}"
        )
    result = np.empty(dims, dtype=np.float32)
    source = np.ascontiguousarray(data).reshape(-1)
    ROW_DEQUANTIZERS[dtype_info.name](source, result.reshape(-1))
    return result
