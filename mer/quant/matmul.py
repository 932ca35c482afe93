"""Quantized matrix times activations, straight on a matrix's stored bytes.

    out = matmul(matrix, data, x, rows=slice(...), columns=slice(...), threads=1)

computes `out[t, i] = sum_j W[rows.start + i, columns.start + j] * x[t, j]` for the matrix `W`
described by `matrix` (a `MatrixSpec`: dtype, shape, layout) whose bytes are `data`, without
dequantizing it as a whole and without touching the bytes outside the slices:

- q4_0 and q8_0 ("native" or "planar" layout): `x` is first rounded to q8_0 per 32-block (as
  llama.cpp does, `mer.quant.activation`), then exact integer block dots are scaled and summed
  in float32 (`kernels_vnni` on AVX-512 VNNI CPUs, else `kernels_avx2` on AVX2 + FMA + F16C
  CPUs, else `kernels_portable`);
- mxfp4: the same q8_0 rounding, then exact integer block dots with the doubled E2M1 table scaled
  by half the E8M0 scale (`kernels_vnni`, else `kernels_avx2`, else `kernels_mxfp4`, portable);
- q4_k, q5_k, q6_k (native layout): `x` is first rounded to Q8_K per 256-block (as llama.cpp
  does, `mer.quant.activation_k`), then exact integer sub-block dots, scales and mins are
  combined per super-block in float32, on the packed bytes (`kernels_kquant` with 64-byte
  vectors on AVX-512 VNNI CPUs, 32-byte ones on AVX2 CPUs, else `matmul_kquant`'s portable
  kernel);
- f32, f16, bf16: each row is dequantized into a float32 buffer and dotted with the float32
  `x` (`matmul_generic`).

`threads` > 1 runs the rows on numba's thread pool (never together with a BLAS pool); 1 runs in
the calling thread and starts no pool.
"""

from __future__ import annotations

import numba
import numpy as np

from mer.errors import ConfigError, ShapeError, UnsupportedDTypeError
from mer.compute.expert_format import MatrixSpec
from mer.quant import planar as planar_layout
from mer.quant.activation import BLOCKS_PER_GROUP, QuantizedActivation, quantize_activation
from mer.quant.activation_k import K_QUANT_DTYPES, SuperBlockActivation, quantize_activation_k
from mer.quant.matmul_generic import DTYPE_CODES, dequantizing_matmul, dequantizing_matmul_parallel
from mer.quant.matmul_quantized import (
    AVX2_KERNELS,
    VNNI_KERNEL_CODES,
    portable_matmul,
    portable_matmul_parallel,
    vnni_matmul,
    vnni_matmul_parallel,
)
from mer.quant.kernels_mxfp4 import MXFP4_QUANTS_OFFSET, MXFP4_SCALE_OFFSET, mxfp4_matmul, mxfp4_matmul_parallel
from mer.quant.matmul_kquant import (
    PORTABLE_CODES,
    SIMD_KQUANT_KERNELS,
    portable_kquant_matmul,
    portable_kquant_matmul_parallel,
)
from mer.quant.vector_ir import fastest_kernel, has_avx2_kernels, has_vnni_kernels

FUSED_DTYPES = tuple(BLOCKS_PER_GROUP)
CHUNKS_PER_THREAD = 4
KERNELS = ("auto", "vnni", "avx2", "portable")
Activation = np.ndarray | QuantizedActivation | SuperBlockActivation
VECTOR_WIDTHS = {"vnni": 64, "avx2": 32}


def uses_quantized_activation(dtype: str) -> bool:
    """True when `dtype`'s kernel rounds its input to q8_0 (q4_0, q8_0, mxfp4) or Q8_K (K-quants)."""
    return dtype in FUSED_DTYPES or dtype in K_QUANT_DTYPES


def prepare_activation(dtype: str, x: np.ndarray) -> Activation:
    """`x` (float32 `[batch, n]`) as the input of a `dtype` matmul; reusable for several
    matrices of that dtype and the same columns (gate and up)."""
    rows = _float_rows(x)
    if dtype in K_QUANT_DTYPES:
        return quantize_activation_k(rows, dtype)
    if uses_quantized_activation(dtype):
        return quantize_activation(rows, dtype)
    return rows


def round_float_activation(dtype: str, x: np.ndarray) -> np.ndarray:
    """`x` (float32) rounded as ggml rounds the input of a `dtype` matmul before its dot
    products: to f16 for f16 weights, to bf16 for bf16 weights (round to nearest even, NaN kept
    quiet), unchanged otherwise (q4_0/q8_0 inputs are rounded to q8_0, K-quant inputs to Q8_K,
    by `prepare_activation`)."""
    values = np.asarray(x, dtype=np.float32)
    if dtype == "f16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        bits = values.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
        quiet_nan = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
        return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint32).view(np.float32)
    return values


def _float_rows(x: np.ndarray) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.floating):
        raise ShapeError(
            f"activation must be a float array of 1 or 2 dimensions, got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(np.atleast_2d(array), dtype=np.float32)


def _checked_range(part: slice | None, size: int, what: str, quantum: int = 1) -> tuple[int, int]:
    if part is None:
        return 0, size
    start, stop = part.start or 0, size if part.stop is None else part.stop
    if part.step not in (None, 1) or not 0 <= start < stop <= size or start % quantum or stop % quantum:
        raise ShapeError(
            f"{what} slice {part} must be a non-empty, step-1 range inside 0..{size}"
            + (f" whose ends are multiples of {quantum}" if quantum > 1 else "")
        )
    return start, stop


def _activation_columns(activation: Activation) -> int:
    if isinstance(activation, QuantizedActivation):
        return activation.num_blocks * 32
    if isinstance(activation, SuperBlockActivation):
        return activation.num_blocks * 256
    return int(activation.shape[1])


def matmul(
    matrix: MatrixSpec,
    data: np.ndarray,
    x: np.ndarray | QuantizedActivation | SuperBlockActivation,
    *,
    rows: slice | None = None,
    columns: slice | None = None,
    threads: int = 1,
    kernel: str = "auto",
) -> np.ndarray:
    """`W[rows, columns] · x[t]` for each token t: float32 `[batch, num_rows]` (`[num_rows]`
    when `x` is 1-D). `x` is float32 `[batch, num_columns]` or a `prepare_activation` result.

    `kernel` picks the q4_0/q8_0/K-quant implementation: "auto" (`vector_ir.fastest_kernel()`:
    VNNI, else AVX2, else portable), "vnni", "avx2" or "portable"; f32/f16/bf16 ignore it.
    """
    dtype = matrix.dtype_info
    if not is_kernel_available(kernel):
        raise UnsupportedDTypeError(f"kernel {kernel!r} is not one of {KERNELS} available on this CPU")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size != matrix.nbytes:
        found = f"{data.dtype} x {data.size}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ShapeError(f"matrix {matrix.name}: expected {matrix.nbytes} uint8 bytes, got {found}")
    name = f"matrix {matrix.name}"
    row_start, row_stop = _checked_range(rows, matrix.rows, f"{name} row")
    column_start, column_stop = _checked_range(columns, matrix.columns, f"{name} column", dtype.block_size)
    is_vector = isinstance(x, np.ndarray) and x.ndim == 1
    is_prepared = isinstance(x, (QuantizedActivation, SuperBlockActivation))
    activation = x if is_prepared else prepare_activation(dtype.name, x)
    if _activation_columns(activation) != column_stop - column_start:
        raise ShapeError(
            f"matrix {matrix.name}: activation has {_activation_columns(activation)} columns, "
            f"the column range {column_start}..{column_stop} has {column_stop - column_start}"
        )
    is_quantized = isinstance(activation, (QuantizedActivation, SuperBlockActivation))
    if uses_quantized_activation(dtype.name) != is_quantized or (
        is_quantized and activation.weight_dtype != dtype.name
    ):
        raise UnsupportedDTypeError(f"{name} ({dtype.name}): activation prepared for another dtype")
    batch = activation.batch if is_quantized else activation.shape[0]
    out = np.empty((batch, row_stop - row_start), dtype=np.float32)
    block_range = (column_start // dtype.block_size, (column_stop - column_start) // dtype.block_size)
    flat = np.ascontiguousarray(data).reshape(-1)
    chosen = fastest_kernel() if kernel == "auto" else kernel
    if isinstance(activation, SuperBlockActivation):
        _kquant_matmul(matrix, flat, activation, row_start, row_stop, block_range, out, threads, chosen)
    elif isinstance(activation, QuantizedActivation):
        _fused_matmul(matrix, flat, activation, row_start, row_stop, block_range, out, threads, chosen)
    else:
        _dequantizing_matmul(matrix, flat, activation, row_start, row_stop, block_range, out, threads)
    return out[0] if is_vector else out


def is_kernel_available(kernel: str) -> bool:
    """True when `kernel` is one of KERNELS and this CPU can run it."""
    available = {"auto": True, "vnni": has_vnni_kernels(), "avx2": has_avx2_kernels(), "portable": True}
    return available.get(kernel, False)


def block_addressing(matrix: MatrixSpec, block_start: int, num_blocks: int) -> tuple[int, ...]:
    """The `addressing` tuple of `matmul_quantized` for a q4_0/q8_0/mxfp4 matrix's block range."""
    dtype = matrix.dtype_info
    blocks_per_row = matrix.columns // dtype.block_size
    if dtype.name == "mxfp4":  # no planar form: its bytes are the same in both layouts
        quants, scales = (MXFP4_QUANTS_OFFSET, dtype.type_size), (MXFP4_SCALE_OFFSET, dtype.type_size)
    elif matrix.layout == "planar":
        quant_bytes = planar_layout.quant_bytes_per_block(dtype.name)
        scales_base = planar_layout.scales_offset(dtype.name, matrix.rows, matrix.columns)
        quants, scales = (0, quant_bytes), (scales_base, planar_layout.SCALE_BYTES)
    else:
        quants, scales = (planar_layout.SCALE_BYTES, dtype.type_size), (0, dtype.type_size)
    return (*quants, *scales, blocks_per_row, block_start, num_blocks)


def _run_kernel(kernel, parallel_kernel, arguments: tuple, threads: int) -> None:
    """`kernel(*arguments)` in this thread, or `parallel_kernel` on `threads` numba threads (chunked)."""
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    num_threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    if num_threads == 1:
        kernel(*arguments)
    else:
        numba.set_num_threads(num_threads)
        parallel_kernel(*arguments, num_threads * CHUNKS_PER_THREAD)


def _fused_matmul(
    matrix: MatrixSpec,
    data: np.ndarray,
    activation: QuantizedActivation,
    row_start: int,
    row_stop: int,
    block_range: tuple[int, int],
    out: np.ndarray,
    threads: int,
    kernel: str,
) -> None:
    addressing = block_addressing(matrix, *block_range)
    arguments = (data, addressing, row_start, row_stop, activation.quants, activation.block_scales, out)
    name = matrix.dtype_info.name
    kind = (name, matrix.layout == "planar" and name != "mxfp4")  # mxfp4 has no planar form
    if kernel == "vnni":
        _run_kernel(vnni_matmul, vnni_matmul_parallel, (*arguments, VNNI_KERNEL_CODES[kind]), threads)
    elif kernel == "avx2":
        _run_kernel(*AVX2_KERNELS[kind], arguments, threads)
    elif name == "mxfp4":
        _run_kernel(mxfp4_matmul, mxfp4_matmul_parallel, arguments, threads)
    else:
        is_q4_0 = name == "q4_0"
        _run_kernel(portable_matmul, portable_matmul_parallel, (*arguments, is_q4_0), threads)


def _dequantizing_matmul(
    matrix: MatrixSpec,
    data: np.ndarray,
    x: np.ndarray,
    row_start: int,
    row_stop: int,
    block_range: tuple[int, int],
    out: np.ndarray,
    threads: int,
) -> None:
    dtype = matrix.dtype_info
    if matrix.layout == "planar" and planar_layout.has_planar_form(dtype.name):
        raise UnsupportedDTypeError(f"matrix {matrix.name}: planar {dtype.name} needs the fused kernel")
    row_bytes = dtype.row_nbytes(matrix.columns)
    byte_start, byte_count = block_range[0] * dtype.type_size, block_range[1] * dtype.type_size
    code = DTYPE_CODES[dtype.name]
    arguments = (code, data, row_bytes, byte_start, byte_count, row_start, row_stop, x, out)
    _run_kernel(dequantizing_matmul, dequantizing_matmul_parallel, arguments, threads)


def _kquant_matmul(
    matrix: MatrixSpec,
    data: np.ndarray,
    activation: SuperBlockActivation,
    row_start: int,
    row_stop: int,
    block_range: tuple[int, int],
    out: np.ndarray,
    threads: int,
    kernel: str,
) -> None:
    dtype = matrix.dtype_info  # K-quants have no planar form: both layouts are the GGUF bytes
    position = (block_range[0] * dtype.type_size, dtype.row_nbytes(matrix.columns), block_range[1])
    arguments = (data, position, row_start, row_stop, activation.quants, activation.sums, activation.scales, out)
    if kernel in VECTOR_WIDTHS:
        single, parallel = SIMD_KQUANT_KERNELS[(dtype.name, VECTOR_WIDTHS[kernel])]
        _run_kernel(single, parallel, arguments, threads)
    else:
        code = PORTABLE_CODES[dtype.name]
        _run_kernel(portable_kquant_matmul, portable_kquant_matmul_parallel, (*arguments, code), threads)
