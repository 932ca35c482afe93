"""The q4_K / q5_K / q6_K kernels against independent references.

- The activation rounding is ggml's Q8_K, checked bit for bit against the `quantize_row_q8_K`
  of the llama.cpp bundled with llama-cpp-python (d, quants and the int16 block sums).
- Each kernel (portable, AVX-512 VNNI, AVX2, where the CPU has it) against the float64 product
  of `gguf.quants.dequantize`'s weights and the Q8_K-rounded activation (`reference_q8_k`
  of `tests.support.quant_helpers`, written out from ggml's rule): only float32 arithmetic differs, |error| <= 1e-6 *
  sum_j |W_ij * x_j| (measured 5e-9 to 4e-8: the block sums are exact integers, combined with
  d, dmin and d_x in float32). Against the unrounded activation the error is the rounding's
  own (each element off by up to amax/254 of its 256-block): relative 2-norm error in
  (1e-4, 3e-2).
- Exact integer dots: with d = dmin = 1 and activations whose every 256-block has a -127 (so
  Q8_K keeps them exactly, d_x = 1), every output is an integer whose partial sums all stay
  below 2^24, so every kernel, on 1 and 2 threads, must give the integer product bit for bit
  (6-bit scales and mins of the whole range, all quants, the extremes included).
- Threads, row and column (super-block) slices give the same numbers; batch sizes 1 to 33 and
  odd row counts run every token and row tail of the kernels.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from mer.compute.dtypes import dtype_by_name
from mer.compute.expert_format import MatrixSpec
from mer.errors import ShapeError, UnsupportedDTypeError
from mer.quant import matmul as matmul_module
from mer.quant.activation_k import K4_ORDER, quantize_activation_k
from mer.quant.matmul import matmul, prepare_activation
from mer.quant.vector_ir import has_avx2_kernels, has_vnni_kernels
from tests.support.quant_helpers import random_matrix, reference_q8_k

SEED = 5151
K_QUANTS = ["q4_k", "q5_k", "q6_k"]
FLOAT32_TOLERANCE = 1e-6
KERNELS = [
    "portable",
    pytest.param("vnni", marks=pytest.mark.skipif(not has_vnni_kernels(), reason="the CPU lacks AVX-512 VNNI")),
    pytest.param("avx2", marks=pytest.mark.skipif(not has_avx2_kernels(), reason="the CPU lacks AVX2 + FMA + F16C")),
]
AVAILABLE_KERNELS = [kernel for kernel in ("portable", "vnni", "avx2") if matmul_module.is_kernel_available(kernel)]
D_FIELDS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # byte offsets of the f16 d (and dmin)


def make_matrix(dtype: str, rows: int, columns: int, seed: int = SEED) -> tuple[MatrixSpec, np.ndarray, np.ndarray]:
    """(spec, stored bytes, float64 reference weights) of a random valid matrix."""
    native = random_matrix(dtype, rows, columns, (seed, rows, columns))
    weights = gguf_dequantize(native, dtype_by_name(dtype).ggml_type).astype(np.float64)
    spec = MatrixSpec("gate", dtype, rows, columns, 0, native.size, "native")
    spec.validate()
    return spec, native.reshape(-1), weights


def tokens(batch: int, columns: int, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed + batch).standard_normal((batch, columns)).astype(np.float32)


def assert_float32_close(out: np.ndarray, weights: np.ndarray, x: np.ndarray) -> None:
    expected = x @ weights.T
    bound = FLOAT32_TOLERANCE * (np.abs(x) @ np.abs(weights).T) + 1e-30
    assert out.dtype == np.float32 and out.shape == expected.shape
    assert np.all(np.abs(out - expected) <= bound), np.max(np.abs(out - expected) / bound)


def ggml_quantize_row_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, int8 quants, int16 block sums) of ggml's own `quantize_row_q8_K` (292-byte blocks)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    quantize = library.quantize_row_q8_K
    quantize.argtypes, quantize.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    row = np.ascontiguousarray(x, dtype=np.float32)
    blocks = np.zeros((row.size // 256, 292), dtype=np.uint8)
    quantize(row.ctypes.data, blocks.ctypes.data, row.size)
    return blocks[:, :4].copy().view(np.float32)[:, 0], blocks[:, 4:260].view(np.int8), blocks[:, 260:].copy().view(np.int16)


@pytest.mark.llama
def test_activation_rounding_is_ggml_q8_k_bit_for_bit() -> None:
    rng = np.random.default_rng(SEED)
    x = (rng.standard_normal((6, 1024)) * np.float32(3)).astype(np.float32)
    x[1, :256] = 0  # an all-zero block: d = 0, q = 0
    x[2, :256] = np.round(x[2, :256] * 20) / 2  # many exact halves (ties to even)
    x[3, 10], x[3, 20] = -40, 40  # tie on the largest magnitude: the first one maps to -127
    x[4, 300], x[4, 301] = 50, -50
    x[5] *= np.float32(1e-30)  # tiny values
    for weight_dtype in K_QUANTS:
        activation = quantize_activation_k(x, weight_dtype)
        for token in range(x.shape[0]):
            d, quants, sums = ggml_quantize_row_q8_k(x[token])
            ours = activation.quants[:, token, :]
            if weight_dtype != "q6_k":
                ours = ours[:, np.argsort(K4_ORDER)]  # back to the natural order
            assert np.array_equal(activation.scales[:, token, 0], d)
            run_sums = sums.reshape(-1, 8, 2).sum(axis=2).astype(np.float32)
            assert np.array_equal(activation.scales[:, token, 1:], d[:, None] * run_sums)
            assert np.array_equal(ours, quants)
            assert np.array_equal(activation.sums[:, token, :], sums)
    assert np.array_equal(reference_q8_k(x), quants_and_scales_product(x))  # the test's own rule is ggml's


def quants_and_scales_product(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_K of every row, dequantized (q * d) as float64."""
    rows = []
    for row in x:
        d, quants, _ = ggml_quantize_row_q8_k(row)
        rows.append((quants.astype(np.float64) * d.astype(np.float64)[:, None]).reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", K_QUANTS)
@pytest.mark.parametrize("batch", [1, 3, 8, 11, 33])
def test_kernels_match_the_reference(dtype: str, kernel: str, batch: int) -> None:
    rows, columns = 37, 768  # odd rows (row-pair tail), 3 super-blocks
    spec, data, weights = make_matrix(dtype, rows, columns)
    x = tokens(batch, columns)
    out = matmul(spec, data, x, kernel=kernel)
    assert_float32_close(out, weights, reference_q8_k(x))
    unrounded = x.astype(np.float64) @ weights.T
    relative = np.linalg.norm(out - unrounded) / np.linalg.norm(unrounded)
    assert 1e-4 < relative < 3e-2  # the activation rounding is there, and no larger than expected


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", K_QUANTS)
def test_threads_and_slices_give_the_same_numbers(dtype: str, kernel: str) -> None:
    spec, data, weights = make_matrix(dtype, 75, 1024)
    x = tokens(9, 1024)
    reference_x = reference_q8_k(x)
    one_thread = matmul(spec, data, x, threads=1, kernel=kernel)
    assert np.array_equal(matmul(spec, data, x, threads=2, kernel=kernel), one_thread)
    rows, columns = slice(7, 62), slice(256, 768)
    part = matmul(spec, data, x[:, columns], rows=rows, columns=columns, threads=2, kernel=kernel)
    assert_float32_close(part, weights[rows, columns], reference_x[:, columns])
    assert np.array_equal(part, matmul(spec, data, x[:, columns], rows=rows, columns=columns, kernel=kernel))
    partials = [matmul(spec, data, x[:, start:stop], columns=slice(start, stop), kernel=kernel)
                for start, stop in ((0, 256), (256, 768), (768, 1024))]
    assert np.allclose(sum(partials), one_thread, rtol=0, atol=1e-5 * np.abs(one_thread).max())


def integer_matrix(dtype: str, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(native bytes, int64 weights) of a random matrix whose every d (and dmin) is 1.0: random
    quants and 6-bit scales / mins of the whole range (the random generator's), row 0 of every
    super-block at the quants' top value (every bit set)."""
    native = random_matrix(dtype, rows, columns, (SEED, K_QUANTS.index(dtype)))
    info = dtype_by_name(dtype)
    blocks = native.reshape(rows * columns // 256, info.type_size)
    one = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    for at in D_FIELDS[dtype]:
        blocks[:, at : at + 2] = one
    first_row = blocks[: columns // 256]
    if dtype == "q6_k":
        first_row[:, :192] = 0xFF  # q = 63 everywhere
    else:
        first_row[:, 16:] = 0xFF  # q = 15 (q4_K) or 31 (q5_K: high bits set too)
    weights = gguf_dequantize(native, info.ggml_type).astype(np.float64)
    assert np.array_equal(weights, np.round(weights))
    return native.reshape(-1), weights.astype(np.int64)


def integer_tokens(batch: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Integer activations in [-127, 127], each 256-block led by a -127 (so Q8_K keeps them
    exactly with d = 1): mostly small (the sums must stay below 2^24), 3 % at +-127."""
    x = rng.integers(-7, 8, size=(batch, columns))
    x[rng.random(x.shape) < 0.03] = -127
    x[rng.random(x.shape) < 0.03] = 127
    x.reshape(batch, -1, 256)[:, :, 0] = -127
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", K_QUANTS)
def test_integer_dots_are_exact_in_every_kernel(dtype: str) -> None:
    rows, columns, batch = 13, 512, 11
    native, weights = integer_matrix(dtype, rows, columns)
    spec = MatrixSpec("gate", dtype, rows, columns, 0, native.size, "native")
    x = integer_tokens(batch, columns, np.random.default_rng(SEED))
    expected = x.astype(np.int64) @ weights.T
    assert (np.abs(x).astype(np.int64) @ np.abs(weights).T).max() < 2**24  # every partial sum exact in float32
    assert np.abs(expected).max() > 100_000
    for kernel in AVAILABLE_KERNELS:
        for threads in (1, 2):
            out = matmul(spec, native, x, threads=threads, kernel=kernel)
            assert np.array_equal(out, expected.astype(np.float32)), (kernel, threads)


def test_prepared_activation_is_reused_and_checked() -> None:
    spec, data, _ = make_matrix("q4_k", 8, 512)
    x = tokens(2, 512)
    prepared = prepare_activation("q4_k", x)
    assert np.array_equal(matmul(spec, data, prepared), matmul(spec, data, x))
    with pytest.raises(UnsupportedDTypeError, match="another dtype"):
        matmul(spec, data, prepare_activation("q6_k", x))
    with pytest.raises(UnsupportedDTypeError, match="another dtype"):
        matmul(spec, data, prepare_activation("q4_0", x))
    with pytest.raises(ShapeError, match="multiples of 256"):
        matmul(spec, data, x[:, :128], columns=slice(0, 128))
    with pytest.raises(ShapeError, match="multiple of 256"):
        quantize_activation_k(np.zeros((1, 300), dtype=np.float32), "q4_k")
    with pytest.raises(UnsupportedDTypeError, match="q4_0"):
        quantize_activation_k(np.zeros((1, 256), dtype=np.float32), "q4_0")


FRESH_OR_CACHED = """
import hashlib, numpy as np
from mer.compute.expert_format import MatrixSpec
from mer.quant.matmul import matmul
from tests.support.quant_helpers import random_matrix
native = random_matrix("{dtype}", 6, 512, (1, 2))
spec = MatrixSpec("gate", "{dtype}", 6, 512, 0, native.size, "native")
x = np.random.default_rng(3).standard_normal((3, 512)).astype(np.float32)
print(hashlib.sha256(matmul(spec, native.reshape(-1), x).tobytes()).hexdigest())
"""


@pytest.mark.slow  # compiles the kernels in a fresh numba cache
@pytest.mark.parametrize("dtype", ["q4_k", "q6_k"])
def test_a_fresh_compile_and_numba_s_cache_give_the_same_bits(dtype: str, tmp_path: Path) -> None:
    """Worker processes may compile the kernels or load them from numba's cache; both must
    compute the same bits (with fast-math flags they did not: LLVM reassociated differently)."""
    import os
    import subprocess
    import sys

    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    script = FRESH_OR_CACHED.format(dtype=dtype)
    runs = [subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                           check=True, timeout=300).stdout.strip() for _ in range(2)]
    assert any(tmp_path.rglob("*.nbc"))  # the second run loaded what the first compiled
    assert runs[0] == runs[1] and len(runs[0]) == 64


@pytest.mark.parametrize("dtype", K_QUANTS)
def test_extreme_quants_and_activations_do_not_saturate(dtype: str) -> None:
    """Row 0 has every quant at its top value and the activations round to all +127 or all
    -127: the VNNI kernel's 4-product int32 lanes then reach +-4 * 63 * 127 (q6_K) before being
    packed to int16, and the AVX2 kernel's byte-pair sums +-2 * 63 * 127; nothing may clip."""
    rows, columns = 5, 512
    native, weights = integer_matrix(dtype, rows, columns)
    spec = MatrixSpec("gate", dtype, rows, columns, 0, native.size, "native")
    x = np.ones((3, columns), dtype=np.float32)
    x[1] = -1.0
    x[2, ::8] = -1.0  # mixed signs inside the lanes
    for kernel in AVAILABLE_KERNELS:
        out = matmul(spec, native, x, kernel=kernel)
        assert_float32_close(out, weights.astype(np.float64), reference_q8_k(x))
