"""The matmul kernels against an independent float64 reference built with gguf-py.

Reference: `gguf.quants.dequantize` of the same bytes, then a float64 matmul. Tolerances:

- q4_0 / q8_0 kernels round the activation to q8_0 per 32-block (llama.cpp's rule, written out
  independently in `reference_q8_0` below). Against the float64 product with THAT rounded
  activation, only float32 arithmetic differs: |error| <= 1e-6 * sum_j |W_ij * x_j| (measured:
  ~2e-8; the float32 sums run over whole blocks of exact integer products).
  Against the product with the unrounded activation the error is the rounding's own, each
  activation element being off by up to amax/254 (~0.4 % of the block's largest value):
  relative (2-norm) error <= 2e-2; ~5e-3 is measured here, ~1e-2 per expert as for ggml.
- the other dtypes use float32 weights (exactly gguf-py's dequantization) and float32
  activations with float32 accumulation: |error| <= 1e-6 * sum_j |W_ij * x_j| (float32
  rounding of a few hundred products and sums; measured ~2e-8).
- partials of column slices summed equal the full product to 1e-5 of its largest value (the
  same products, summed in another order in float32).
- the exact integer block dots are checked exactly: with every weight and activation scale 1
  the products are integers below 2^24, so every kernel must give the integer reference bit
  for bit, whatever its float summation order (extreme weights and activations included, where
  the AVX2 kernel's int16 pair sums would saturate if its operand ranges were wrong).

The VNNI and AVX2 kernels run where the CPU has their instructions and are skipped, with the
reason, elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mer.compute.dtypes import dtype_by_name
from mer.errors import ConfigError, ShapeError, UnsupportedDTypeError
from mer.compute.expert_format import MatrixSpec
from mer.quant.activation import quantize_activation
from mer.quant.matmul import matmul, prepare_activation
from mer.quant.planar import to_planar
from tests.support.quant_helpers import dequantize_activation, random_matrix, reference_q8_k
from mer.quant import matmul as matmul_module
from mer.quant import vector_ir
from mer.quant.vector_ir import fastest_kernel, has_avx2_kernels, has_vnni_kernels

SEED = 4242
FUSED = ["q4_0", "q8_0"]
GENERIC = ["f16", "bf16", "f32"]  # the K-quants: tests/unit/test_matmul_kquant.py
FLOAT32_TOLERANCE = 1e-6
KERNELS = [
    "portable",
    pytest.param("vnni", marks=pytest.mark.skipif(not has_vnni_kernels(), reason="the CPU lacks AVX-512 VNNI")),
    pytest.param(
        "avx2", marks=pytest.mark.skipif(not has_avx2_kernels(), reason="the CPU lacks AVX2 + FMA + F16C")
    ),
]
AVAILABLE_KERNELS = [kernel for kernel in ("portable", "vnni", "avx2") if matmul_module.is_kernel_available(kernel)]


def reference_q8_0(x: np.ndarray) -> np.ndarray:
    """llama.cpp's q8_0 rounding of float32 rows, dequantized, as float64."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inverse)
    return (q * d).reshape(x.shape)


def make_matrix(
    dtype: str, rows: int, columns: int, layout: str, seed: int = SEED
) -> tuple[MatrixSpec, np.ndarray, np.ndarray]:
    """(spec, stored bytes, float64 reference weights) of a random valid matrix."""
    info = dtype_by_name(dtype)
    native = random_matrix(dtype, rows, columns, (seed, rows, columns))
    weights = gguf_dequantize(native, info.ggml_type).astype(np.float64)
    assert weights.shape == (rows, columns)
    data = native.reshape(-1) if layout == "native" else to_planar(dtype, native.reshape(-1), rows, columns)
    spec = MatrixSpec("gate", dtype, rows, columns, 0, data.size, layout)
    spec.validate()
    return spec, data, weights


def tokens(batch: int, columns: int, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed + batch).standard_normal((batch, columns)).astype(np.float32)


def assert_float32_close(out: np.ndarray, weights: np.ndarray, x: np.ndarray) -> None:
    expected = x @ weights.T
    bound = FLOAT32_TOLERANCE * (np.abs(x) @ np.abs(weights).T) + 1e-30
    assert out.dtype == np.float32 and out.shape == expected.shape
    assert np.all(np.abs(out - expected) <= bound), np.max(np.abs(out - expected) / bound)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["native", "planar"])
@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("batch", [1, 3, 5, 8, 11, 33])
def test_fused_kernels_match_the_reference(dtype: str, layout: str, kernel: str, batch: int) -> None:
    rows, columns = 37, 608  # odd rows (row-pair tail), 19 blocks (partial last group)
    spec, data, weights = make_matrix(dtype, rows, columns, layout)
    x = tokens(batch, columns)
    out = matmul(spec, data, x, kernel=kernel)
    assert_float32_close(out, weights, reference_q8_0(x))
    unrounded = x.astype(np.float64) @ weights.T
    relative = np.linalg.norm(out - unrounded) / np.linalg.norm(unrounded)
    assert 1e-4 < relative < 2e-2  # the activation rounding is there, and no larger than expected


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", FUSED)
def test_a_batch_of_several_token_tiles_gives_the_bits_of_small_batches(dtype: str, kernel: str) -> None:
    """300 tokens over 4096 columns span three token tiles of the SIMD kernels (`_token_tile`: 112
    tokens): the same bits as 8 tokens at a time, and the reference's values."""
    from mer.quant.matmul_quantized import _token_tile

    rows, columns, batch = 21, 4096, 300
    spec, data, weights = make_matrix(dtype, rows, columns, "planar")
    x = tokens(batch, columns)
    tile = _token_tile(prepare_activation(dtype, x[:1]).quants)
    assert tile % 8 == 0 and 2 * tile < batch
    out = matmul(spec, data, x, kernel=kernel)
    pieces = np.concatenate([matmul(spec, data, x[start : start + 8], kernel=kernel) for start in range(0, batch, 8)])
    assert np.array_equal(out, pieces)
    assert_float32_close(out, weights, reference_q8_0(x))


@pytest.mark.parametrize("dtype", GENERIC)
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_generic_kernels_match_the_reference(dtype: str, batch: int) -> None:
    rows, columns = 21, 512
    spec, data, weights = make_matrix(dtype, rows, columns, "native")
    x = tokens(batch, columns)
    assert_float32_close(matmul(spec, data, x), weights, x.astype(np.float64))


def _with_kernel_marks(dtype: str, layout: str, kernel) -> object:  # type: ignore[no-untyped-def]
    """A (dtype, layout, kernel) case carrying the kernel's skip mark, if any."""
    if isinstance(kernel, str):
        return (dtype, layout, kernel)
    return pytest.param(dtype, layout, kernel.values[0], marks=kernel.marks)


@pytest.mark.parametrize(
    "dtype, layout, kernel",
    [_with_kernel_marks(dtype, layout, kernel) for dtype in FUSED for layout in ("native", "planar") for kernel in KERNELS]
    + [(dtype, "native", "auto") for dtype in GENERIC],
)
def test_row_and_column_slices(dtype: str, layout: str, kernel: str) -> None:
    rows, columns = 30, 768
    block = dtype_by_name(dtype).block_size
    spec, data, weights = make_matrix(dtype, rows, columns, layout)
    x = tokens(3, columns)
    reference_x = reference_q8_0(x) if dtype in FUSED else x.astype(np.float64)
    row_part = matmul(spec, data, x, rows=slice(7, 20), kernel=kernel)
    assert_float32_close(row_part, weights[7:20], reference_x)
    bounds = [0, block, 5 * block, columns] if block == 32 else [0, 256, 512, 768]
    partials = []
    for start, stop in zip(bounds, bounds[1:]):
        part = matmul(spec, data, x[:, start:stop], columns=slice(start, stop), kernel=kernel)
        assert_float32_close(part, weights[:, start:stop], reference_x[:, start:stop])
        partials.append(part)
    full = matmul(spec, data, x, kernel=kernel)
    assert np.allclose(sum(partials), full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize(
    "dtype, layout, kernel",
    [
        ("q4_0", "planar", "auto"),
        ("q8_0", "native", "auto"),
        ("q4_0", "native", "portable"),
        ("q6_k", "native", "auto"),
    ]
    + [_with_kernel_marks(dtype, layout, KERNELS[2]) for dtype in FUSED for layout in ("native", "planar")],
)
def test_threads_give_the_same_result(dtype: str, layout: str, kernel: str) -> None:
    spec, data, weights = make_matrix(dtype, 75, 512, layout)
    x = tokens(9, 512)
    one_thread = matmul(spec, data, x, threads=1, kernel=kernel)
    assert np.array_equal(matmul(spec, data, x, threads=2, kernel=kernel), one_thread)
    # an odd row range; for q4_0/q8_0 a column slice starting and ending inside kernel groups
    rows, columns = slice(7, 62), slice(96, 416) if dtype in FUSED else slice(256, 512)
    part = matmul(spec, data, x[:, columns], rows=rows, columns=columns, threads=2, kernel=kernel)
    reference_x = reference_q8_0(x[:, columns]) if dtype in FUSED else reference_q8_k(x[:, columns])
    assert_float32_close(part, weights[rows, columns], reference_x)
    assert np.array_equal(part, matmul(spec, data, x[:, columns], rows=rows, columns=columns, kernel=kernel))


def integer_matrix(dtype: str, rows: int, columns: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(native bytes, int64 weights) of a matrix whose every block scale is 1.0: random quants,
    half of them at the extremes of the dtype's range, and row 0 all at its negative extreme."""
    num_blocks = rows * columns // 32
    if dtype == "q4_0":
        nibbles = rng.integers(0, 16, size=(num_blocks, 32))
        nibbles[rng.random(nibbles.shape) < 0.5] = 0
        nibbles[rng.random(nibbles.shape) < 0.25] = 15
        nibbles[: columns // 32] = 0
        quants = (nibbles[:, :16] | (nibbles[:, 16:] << 4)).astype(np.uint8)
        values = nibbles - 8
    else:
        values = rng.integers(-128, 128, size=(num_blocks, 32))
        values[rng.random(values.shape) < 0.5] = -128
        values[rng.random(values.shape) < 0.25] = 127
        values[: columns // 32] = -128
        quants = values.astype(np.int8).view(np.uint8)
    one = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    native = np.concatenate([np.tile(one, (num_blocks, 1)), quants], axis=1).reshape(-1)
    return native, values.reshape(rows, columns).astype(np.int64)


def integer_tokens(batch: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Integer activations in [-127, 127] whose every block holds +-127 (so q8_0 keeps them
    exactly, with d = 1): extremes and random values, token 0 all -127."""
    x = rng.integers(-127, 128, size=(batch, columns))
    x[rng.random(x.shape) < 0.5] = -127
    x[rng.random(x.shape) < 0.25] = 127
    x[0] = -127
    x.reshape(batch, -1, 32)[:, :, 0] = 127
    return x.astype(np.float32)


@pytest.mark.parametrize("layout", ["native", "planar"])
@pytest.mark.parametrize("dtype", FUSED)
def test_integer_block_dots_are_exact_in_every_kernel(dtype: str, layout: str) -> None:
    rows, columns, batch = 37, 608, 33
    rng = np.random.default_rng(SEED)
    native, weights = integer_matrix(dtype, rows, columns, rng)
    data = native if layout == "native" else to_planar(dtype, native, rows, columns)
    spec = MatrixSpec("gate", dtype, rows, columns, 0, data.size, layout)
    x = integer_tokens(batch, columns, rng)
    expected = x.astype(np.int64) @ weights.T
    assert np.abs(expected).max() < 2**24 and np.abs(expected).max() > 500_000  # exact in float32; large
    for kernel in AVAILABLE_KERNELS:
        for threads in (1, 2):
            out = matmul(spec, data, x, threads=threads, kernel=kernel)
            assert np.array_equal(out, expected.astype(np.float32)), (kernel, threads)
            part = matmul(spec, data, x[:, 64:544], rows=slice(3, 30), columns=slice(64, 544), threads=threads, kernel=kernel)
            assert np.array_equal(part, (x[:, 64:544].astype(np.int64) @ weights[3:30, 64:544].T).astype(np.float32))


def test_auto_picks_the_fastest_kernel_of_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = "vnni" if has_vnni_kernels() else "avx2" if has_avx2_kernels() else "portable"
    assert fastest_kernel() == expected
    spec, data, _ = make_matrix("q4_0", 21, 608, "planar")
    x = tokens(5, 608)
    assert np.array_equal(matmul(spec, data, x), matmul(spec, data, x, kernel=expected))
    monkeypatch.setattr(matmul_module, "has_avx2_kernels", lambda: False)
    with pytest.raises(UnsupportedDTypeError, match="kernel 'avx2' is not one of"):
        matmul(spec, data, x, kernel="avx2")


def test_kernel_availability_follows_numba_cpu_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """NUMBA_CPU_NAME / NUMBA_CPU_FEATURES (a cross-compiled cache) decide, not the host."""
    monkeypatch.setattr(vector_ir.numba_config, "CPU_NAME", "haswell")
    monkeypatch.setattr(vector_ir.numba_config, "CPU_FEATURES", "+avx,+avx2,+fma,+f16c,-avx512f")
    assert vector_ir._compiles_for(vector_ir.AVX2_CPU_FEATURES)
    assert not vector_ir._compiles_for(vector_ir.REQUIRED_CPU_FEATURES)
    monkeypatch.setattr(vector_ir.numba_config, "CPU_FEATURES", "+avx,+avx2,-fma,+f16c")
    assert not vector_ir._compiles_for(vector_ir.AVX2_CPU_FEATURES)


def test_one_token_vector_in_vector_out() -> None:
    spec, data, weights = make_matrix("q4_0", 8, 256, "planar")
    x = tokens(1, 256)[0]
    out = matmul(spec, data, x)
    assert out.shape == (8,)
    assert np.array_equal(out, matmul(spec, data, x[None, :])[0])


def test_prepared_activation_is_reused() -> None:
    spec, data, _ = make_matrix("q8_0", 8, 256, "planar")
    x = tokens(2, 256)
    prepared = prepare_activation("q8_0", x)
    assert np.array_equal(matmul(spec, data, prepared), matmul(spec, data, x))
    with pytest.raises(UnsupportedDTypeError, match="another dtype"):
        matmul(spec, data, prepare_activation("q4_0", x))


def test_activation_rounding_is_llama_cpp_q8_0() -> None:
    x = tokens(4, 1024) * np.float32(3)
    x[1, :32] = 0  # an all-zero block: d = 0, q = 0
    for dtype in FUSED:
        activation = quantize_activation(x, dtype)
        assert np.array_equal(dequantize_activation(activation), reference_q8_0(x).astype(np.float32))
    # gguf-py rounds with 1/d and half away from zero: same d, quants within one step
    ours = reference_q8_0(x)
    q8_0 = dtype_by_name("q8_0").ggml_type
    theirs = gguf_dequantize(gguf_quantize(x, q8_0), q8_0)
    d = (np.abs(x.reshape(4, -1, 32)).max(axis=2) / 127).astype(np.float16).astype(np.float64)
    steps = np.abs(ours - theirs).reshape(4, -1, 32) / np.where(d > 0, d, 1)[:, :, None]
    assert steps.max() <= 1.0 + 1e-6 and (steps > 0.5).mean() < 0.01


def test_bad_slices_and_shapes_are_refused() -> None:
    spec, data, _ = make_matrix("q4_0", 8, 256, "native")
    x = tokens(1, 256)
    with pytest.raises(ShapeError, match="multiples of 32"):
        matmul(spec, data, x[:, :48], columns=slice(16, 64))
    with pytest.raises(ShapeError, match="inside 0..8"):
        matmul(spec, data, x, rows=slice(4, 12))
    with pytest.raises(ShapeError, match="has 64"):
        matmul(spec, data, x, columns=slice(0, 64))
    with pytest.raises(ShapeError, match="uint8 bytes"):
        matmul(spec, data[:-1], x)
    with pytest.raises(ShapeError, match="float array"):
        matmul(spec, data, np.zeros((1, 256), dtype=np.int32))
    with pytest.raises(UnsupportedDTypeError, match="kernel"):
        matmul(spec, data, x, kernel="fastest")


def test_kernel_cache_is_stamped_with_every_kernel_source() -> None:
    """Editing e.g. the intrinsic's module must invalidate the cached drivers (numba alone only
    watches the driver's own file)."""
    from numba.core.caching import CacheImpl

    from mer.quant import kernel_cache, matmul_quantized

    assert CacheImpl._locator_classes[0] is kernel_cache.PackageStampedLocator
    driver = matmul_quantized.vnni_matmul.py_func
    locator = kernel_cache.PackageStampedLocator.from_function(driver, matmul_quantized.__file__)
    assert locator is not None and locator.get_source_stamp()[1] == kernel_cache.sources_stamp()
    assert kernel_cache.PackageStampedLocator.from_function(tokens, __file__) is None
    assert {"kernels_vnni.py", "kernels_avx2.py", "kernels_kquant.py", "vector_ir.py", "dequant.py"} <= set(
        kernel_cache.KERNEL_SOURCES
    )


def test_thread_count_must_be_positive_and_odd_layouts_work() -> None:
    spec, data, weights = make_matrix("q4_0", 6, 256, "native")
    x = tokens(2, 256)
    with pytest.raises(ConfigError, match="threads"):
        matmul(spec, data, x, threads=0)
    read_only = data.copy()
    read_only.setflags(write=False)
    strided = np.zeros(2 * data.size, dtype=np.uint8)
    strided[::2] = data
    expected = matmul(spec, data, x)
    assert np.array_equal(matmul(spec, read_only, x), expected)
    assert np.array_equal(matmul(spec, strided[::2], x), expected)
