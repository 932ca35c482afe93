"""MXFP4 weights: dequantization and the packed-byte kernel against gguf-py's `gguf.quants`.

Reference: `gguf.quants.dequantize` (gguf-py's MXFP4: the doubled E2M1 table times ggml's
`e8m0_to_fp32_half`), a float64 matmul, and llama.cpp's q8_0 rounding of the activation
(`reference_q8_0` of test_matmul, written out independently of mer). Tolerance as for q4_0: only
float32 arithmetic differs, |error| <= 1e-6 * sum_j |W_ij * x_j|. With every scale byte 128 (half
scale 1) the block dots are integers below 2^24 and must be exact, in every kernel (portable, and
AVX-512 VNNI / AVX2 where the CPU has them) at every thread count, extreme weights (+-12) included.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import MXFP4, dequantize as gguf_dequantize, quantize as gguf_quantize

from mer.compute.dtypes import dtype_by_name
from mer.compute.expert_format import MatrixSpec
from mer.quant.activation import quantize_activation
from mer.quant.dequant import dequantize
from mer.quant.matmul import is_kernel_available, matmul, prepare_activation, uses_quantized_activation
from mer.quant.vector_ir import has_avx2_kernels, has_vnni_kernels
from tests.support.quant_helpers import random_matrix
from tests.unit.test_matmul import assert_float32_close, integer_tokens, reference_q8_0, tokens

SEED = 977


def make_mxfp4(rows: int, columns: int, seed: int = SEED) -> tuple[MatrixSpec, np.ndarray, np.ndarray]:
    native = random_matrix("mxfp4", rows, columns, (seed, rows, columns))
    weights = gguf_dequantize(native, GGMLQuantizationType.MXFP4).astype(np.float64)
    spec = MatrixSpec("gate", "mxfp4", rows, columns, 0, native.size)
    spec.validate()
    return spec, native.reshape(-1), weights


def test_geometry_is_ggml_block_mxfp4() -> None:
    dtype = dtype_by_name("MXFP4")
    assert (dtype.block_size, dtype.type_size, dtype.ggml_type) == (32, 17, GGMLQuantizationType.MXFP4)
    assert uses_quantized_activation("mxfp4")


def test_block_values_by_hand() -> None:
    """e = 129 (scale 4, half-scale 2); byte j holds code j % 16 low and 15 - j high."""
    codes = np.arange(16, dtype=np.uint8)
    block = np.concatenate([[129], codes | ((15 - codes) << 4)]).astype(np.uint8)
    doubled = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
    expected = np.concatenate([doubled, doubled[::-1]]) * 2
    assert np.array_equal(dequantize(block, "mxfp4", (32,)), expected)


def test_every_scale_byte_matches_gguf_bit_for_bit() -> None:
    rng = np.random.default_rng(SEED)
    blocks = rng.integers(0, 256, size=(256, 17), dtype=np.uint8)
    blocks[:, 0] = np.arange(256)  # every E8M0 value, subnormal half-scales (0, 1) and 255 included
    with np.errstate(over="ignore"):  # e = 255 with code 7 or 15 is +-inf in both
        expected = gguf_dequantize(blocks, GGMLQuantizationType.MXFP4).astype(np.float32).reshape(256, 32)
    actual = dequantize(blocks, "mxfp4", (256, 32))
    assert np.array_equal(actual.view(np.uint32), expected.view(np.uint32))


def test_gguf_quantized_values_round_trip() -> None:
    values = np.random.default_rng(SEED).standard_normal((4, 64)).astype(np.float32)
    packed = gguf_quantize(values, GGMLQuantizationType.MXFP4)
    expected = MXFP4.dequantize(packed)
    assert np.array_equal(dequantize(packed, "mxfp4", (4, 64)), expected)


@pytest.mark.parametrize("batch", [1, 3, 5, 8, 11, 33])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_the_reference(batch: int, threads: int) -> None:
    rows, columns = 37, 608  # odd rows, 19 blocks (a partial last group of 4)
    spec, data, weights = make_mxfp4(rows, columns)
    x = tokens(batch, columns)
    out = matmul(spec, data, x, threads=threads)
    assert_float32_close(out, weights, reference_q8_0(x))
    unrounded = x.astype(np.float64) @ weights.T
    relative = np.linalg.norm(out - unrounded) / np.linalg.norm(unrounded)
    assert 1e-4 < relative < 2e-2  # the activation rounding is there, and no larger than expected
    assert np.array_equal(out, matmul(spec, data, prepare_activation("mxfp4", x), threads=threads))


def test_row_and_column_slices() -> None:
    rows, columns = 30, 768
    spec, data, weights = make_mxfp4(rows, columns)
    x = tokens(3, columns)
    reference_x = reference_q8_0(x)
    assert_float32_close(matmul(spec, data, x, rows=slice(7, 20)), weights[7:20], reference_x)
    partials = []
    for start, stop in ((0, 32), (32, 160), (160, 768)):
        part = matmul(spec, data, x[:, start:stop], columns=slice(start, stop))
        assert_float32_close(part, weights[:, start:stop], reference_x[:, start:stop])
        partials.append(part)
    full = matmul(spec, data, x)
    assert np.allclose(sum(partials), full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("kernel", ["portable", "vnni", "avx2"])
def test_integer_block_dots_are_exact_at_every_thread_count(kernel: str) -> None:
    if not is_kernel_available(kernel):
        pytest.skip(f"the CPU cannot run the {kernel} kernel")
    rows, columns, batch = 37, 608, 33
    rng = np.random.default_rng(SEED)
    codes = rng.integers(0, 16, size=(rows * columns // 32, 32))
    codes[rng.random(codes.shape) < 0.3] = 15  # -12, the extreme
    codes[: columns // 32] = 7  # row 0 all +12
    packed = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    native = np.concatenate([np.full((codes.shape[0], 1), 128, dtype=np.uint8), packed], axis=1).reshape(-1)
    doubled = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int64)
    weights = doubled[codes].reshape(rows, columns)
    spec = MatrixSpec("gate", "mxfp4", rows, columns, 0, native.size)
    x = integer_tokens(batch, columns, rng)
    expected = x.astype(np.int64) @ weights.T
    assert 100_000 < np.abs(expected).max() < 2**24
    for threads in (1, 2):
        assert np.array_equal(matmul(spec, native, x, threads=threads, kernel=kernel), expected.astype(np.float32))
        part = matmul(spec, native, x[:, 64:544], rows=slice(3, 30), columns=slice(64, 544), threads=threads,
                      kernel=kernel)
        assert np.array_equal(part, (x[:, 64:544].astype(np.int64) @ weights[3:30, 64:544].T).astype(np.float32))


def test_activation_prepared_for_another_dtype_is_refused() -> None:
    spec, data, _ = make_mxfp4(4, 64)
    with pytest.raises(Exception, match="another dtype"):
        matmul(spec, data, quantize_activation(tokens(1, 64), "q8_0"))


KERNELS = [
    "portable",
    pytest.param("vnni", marks=pytest.mark.skipif(not has_vnni_kernels(), reason="the CPU lacks AVX-512 VNNI")),
    pytest.param("avx2", marks=pytest.mark.skipif(not has_avx2_kernels(), reason="the CPU lacks AVX2 + FMA + F16C")),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", [1, 3, 8, 11])
def test_every_kernel_matches_the_reference_and_the_integer_dots(kernel: str, batch: int) -> None:
    spec, data, weights = make_mxfp4(37, 608)
    x = tokens(batch, 608)
    for threads in (1, 2):
        out = matmul(spec, data, x, threads=threads, kernel=kernel)
        assert_float32_close(out, weights, reference_q8_0(x))
        part = matmul(spec, data, x[:, 96:416], rows=slice(7, 30), columns=slice(96, 416), threads=threads,
                      kernel=kernel)  # a column slice that starts and ends inside groups of 4 blocks
        assert_float32_close(part, weights[7:30, 96:416], reference_q8_0(x[:, 96:416]))
    rng = np.random.default_rng(SEED + batch)
    codes = rng.integers(0, 16, size=(37 * 608 // 32, 32))
    packed = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    native = np.concatenate([np.full((codes.shape[0], 1), 128, dtype=np.uint8), packed], axis=1).reshape(-1)
    doubled = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int64)
    integer_x = integer_tokens(batch, 608, rng)
    expected = integer_x.astype(np.int64) @ doubled[codes].reshape(37, 608).T
    assert np.array_equal(matmul(spec, native, integer_x, kernel=kernel), expected.astype(np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
def test_subnormal_and_large_scales_in_every_kernel(kernel: str) -> None:
    """E8M0 bytes 0..150 (half-scales from the subnormal 2^-128 to 2^22), against gguf-py's values."""
    spec, data, _ = make_mxfp4(8, 512)
    blocks = data.reshape(-1, 17).copy()
    blocks[:, 0] = np.arange(blocks.shape[0]) % 151
    weights = gguf_dequantize(blocks.reshape(8, -1), GGMLQuantizationType.MXFP4).astype(np.float64)
    x = tokens(3, 512)
    assert_float32_close(matmul(spec, blocks.reshape(-1), x, kernel=kernel), weights, reference_q8_0(x))
