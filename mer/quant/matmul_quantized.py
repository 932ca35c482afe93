"""Row loops of the q4_0 / q8_0 matmul: `out[t, r] = weights[row r, block range] · activation[t]`.

The VNNI and AVX2 kernels take rows two at a time and tokens eight at a time (a row pair's groups
stay in registers while 16 accumulators are updated), then the leftovers in smaller steps, over
tiles of tokens (all rows for one tile, then the next; see `TILE_ACTIVATION_BYTES`); the portable
kernel goes row by row, token by token. Rows are split into chunks over numba's threads in the
`*_parallel` variants (the only ones that start numba's thread pool).

`addressing` = (quants_base, quant_stride, scales_base, scale_stride, blocks_per_row,
block_start, num_blocks): block `b` of row `r` (counted from the row start) has its quants at
byte `quants_base + (r * blocks_per_row + b) * quant_stride` of the matrix bytes and its f16
scale at `scales_base + (r * blocks_per_row + b) * scale_stride`; each row's blocks
[block_start, block_start + num_blocks) are used. `quants` and `scales` are the arrays of a
`mer.quant.activation.QuantizedActivation`.
"""

from __future__ import annotations

from numba import literally, njit, prange

from mer.quant import kernel_cache  # noqa: F401  (registers the cache locator before @njit runs)
from mer.quant.kernels_portable import portable_row_dot_q4_0, portable_row_dot_q8_0
from mer.quant.kernels_avx2 import avx2_dot
from mer.quant.kernels_vnni import vnni_dot

_FAST = {"cache": True, "fastmath": True, "boundscheck": False, "nogil": True}

# Kernel codes of the VNNI and AVX2 entry points (numba entry points called from Python cannot
# take the compile-time constants the intrinsics need).
# Token tiles: the rows are passed over once per tile of tokens, each row pair's blocks dotted with
# the tile's activations, so that a tile's activations (int8 quants and f32 scales of every block)
# stay in the L2 cache while the weights stream; without tiles a 512-token batch re-read ~2 MB of
# activations from beyond L2 for every row pair. A tile is the most tokens whose activations fit
# in TILE_ACTIVATION_BYTES, a multiple of 8 (at least 8), so the tokens fall into the same 8/4/2/1
# groups as without tiles: the results are bit-identical.
TILE_ACTIVATION_BYTES = 512 * 1024


@njit(**_FAST)
def _token_tile(quants):  # type: ignore[no-untyped-def]
    """Tokens per tile for the activation `quants` ([groups, batch, bytes per group]; each 32 quant
    bytes come with a 4-byte scale): see TILE_ACTIVATION_BYTES."""
    token_bytes = quants.shape[0] * quants.shape[2] * 9 // 8
    return max(8, TILE_ACTIVATION_BYTES // token_bytes // 8 * 8)


VNNI_KERNEL_CODES = {("q4_0", True): 0, ("q4_0", False): 1, ("q8_0", True): 2, ("q8_0", False): 3,
                     ("mxfp4", False): 4}


@njit(**_FAST)
def _store(out, token, column, num_rows, num_tokens, results):  # type: ignore[no-untyped-def]
    """Write a (row-major rows x tokens) result tuple to `out[token + t, column + r]`."""
    for row in range(num_rows):
        for index in range(num_tokens):
            out[token + index, column + row] = results[row * num_tokens + index]


@njit(**_FAST)
def _row_position(addressing, row):  # type: ignore[no-untyped-def]
    """The `position` tuple of `vnni_dot` for the rows starting at `row`."""
    quants_base, quant_stride, scales_base, scale_stride, blocks_per_row, block_start, num_blocks = addressing
    first_block = row * blocks_per_row + block_start
    return (
        quants_base + first_block * quant_stride,
        scales_base + first_block * scale_stride,
        blocks_per_row * quant_stride,
        blocks_per_row * scale_stride,
        num_blocks,
    )


@njit(**_FAST)
def _vnni_row_block(weights, addressing, row, num_rows, quants, scales, out, column, dtype, planar, token_start, token_stop):  # type: ignore[no-untyped-def]
    """Tokens [token_start, token_stop) of `num_rows` (1 or 2, a literal) rows starting at `row`."""
    literally(dtype)
    literally(planar)
    literally(num_rows)
    position = _row_position(addressing, row)
    token = token_start
    while token_stop - token >= 8:
        results8 = vnni_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 8)
        _store(out, token, column, num_rows, 8, results8)
        token += 8
    if token_stop - token >= 4:
        results4 = vnni_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 4)
        _store(out, token, column, num_rows, 4, results4)
        token += 4
    if token_stop - token >= 2:
        results2 = vnni_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 2)
        _store(out, token, column, num_rows, 2, results2)
        token += 2
    if token_stop - token >= 1:
        results1 = vnni_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 1)
        _store(out, token, column, num_rows, 1, results1)


@njit(**_FAST)
def _vnni_rows(weights, addressing, row_start, row_stop, quants, scales, out, out_base, dtype, planar):  # type: ignore[no-untyped-def]
    literally(dtype)
    literally(planar)
    batch = quants.shape[1]
    tile = _token_tile(quants)
    for token_start in range(0, batch, tile):
        token_stop = min(batch, token_start + tile)
        row = row_start
        while row_stop - row >= 2:
            _vnni_row_block(weights, addressing, row, 2, quants, scales, out, row - out_base, dtype, planar,
                             token_start, token_stop)
            row += 2
        if row < row_stop:
            _vnni_row_block(weights, addressing, row, 1, quants, scales, out, row - out_base, dtype, planar,
                             token_start, token_stop)


@njit(**_FAST)
def _vnni_rows_by_code(weights, addressing, start, stop, quants, scales, out, out_base, code):  # type: ignore[no-untyped-def]
    if code == 0:
        _vnni_rows(weights, addressing, start, stop, quants, scales, out, out_base, "q4_0", True)
    elif code == 1:
        _vnni_rows(weights, addressing, start, stop, quants, scales, out, out_base, "q4_0", False)
    elif code == 2:
        _vnni_rows(weights, addressing, start, stop, quants, scales, out, out_base, "q8_0", True)
    elif code == 3:
        _vnni_rows(weights, addressing, start, stop, quants, scales, out, out_base, "q8_0", False)
    else:
        _vnni_rows(weights, addressing, start, stop, quants, scales, out, out_base, "mxfp4", False)


@njit(**_FAST)
def vnni_matmul(weights, addressing, row_start, row_stop, quants, scales, out, code):  # type: ignore[no-untyped-def]
    """`out[t, r - row_start]` for rows [row_start, row_stop), one thread (see VNNI_KERNEL_CODES)."""
    _vnni_rows_by_code(weights, addressing, row_start, row_stop, quants, scales, out, row_start, code)


@njit(parallel=True, **_FAST)
def vnni_matmul_parallel(weights, addressing, row_start, row_stop, quants, scales, out, code, num_chunks):  # type: ignore[no-untyped-def]
    """`vnni_matmul` with the rows split into `num_chunks` chunks (even sizes) on numba's threads."""
    num_pairs = (row_stop - row_start + 1) // 2
    for chunk in prange(num_chunks):
        start = min(row_start + 2 * (chunk * num_pairs // num_chunks), row_stop)
        stop = min(row_start + 2 * ((chunk + 1) * num_pairs // num_chunks), row_stop)
        _vnni_rows_by_code(weights, addressing, start, stop, quants, scales, out, row_start, code)


@njit(**_FAST)
def portable_matmul(weights, addressing, row_start, row_stop, quants, scales, out, is_q4_0):  # type: ignore[no-untyped-def]
    """`out[t, r - row_start]` for rows [row_start, row_stop) with the portable kernel, one thread."""
    quant_stride, scale_stride, num_blocks = addressing[1], addressing[3], addressing[6]
    for row in range(row_start, row_stop):
        position = _row_position(addressing, row)
        quants_at, scales_at = position[0], position[1]
        for token in range(quants.shape[1]):
            if is_q4_0:
                value = portable_row_dot_q4_0(
                    weights, quants_at, quant_stride, scales_at, scale_stride, num_blocks, quants, scales, token
                )
            else:
                value = portable_row_dot_q8_0(
                    weights, quants_at, quant_stride, scales_at, scale_stride, num_blocks, quants, scales, token
                )
            out[token, row - row_start] = value


@njit(parallel=True, **_FAST)
def portable_matmul_parallel(weights, addressing, row_start, row_stop, quants, scales, out, is_q4_0, num_chunks):  # type: ignore[no-untyped-def]
    """`portable_matmul` with the rows split into `num_chunks` chunks on numba's threads."""
    num_rows = row_stop - row_start
    for chunk in prange(num_chunks):
        start = row_start + chunk * num_rows // num_chunks
        stop = row_start + (chunk + 1) * num_rows // num_chunks
        part = out[:, start - row_start : stop - row_start]
        portable_matmul(weights, addressing, start, stop, quants, scales, part, is_q4_0)


@njit(**_FAST)
def _avx2_row_block(weights, addressing, row, num_rows, quants, scales, out, column, dtype, planar, token_start, token_stop):  # type: ignore[no-untyped-def]
    """Tokens [token_start, token_stop) of `num_rows` (1 or 2, a literal) rows starting at `row`, 8 a call:
    measured on the Mixtral gate matrix, batch 8, one thread, 2 rows x 8 tokens (accumulators
    spilled) 9-10 ms, 1 x 8 the same, 2 x 4 11 ms, 2 x 2 14.5 ms."""
    literally(dtype)
    literally(planar)
    literally(num_rows)
    position = _row_position(addressing, row)
    token = token_start
    while token_stop - token >= 8:
        results8 = avx2_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 8)
        _store(out, token, column, num_rows, 8, results8)
        token += 8
    if token_stop - token >= 4:
        results4 = avx2_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 4)
        _store(out, token, column, num_rows, 4, results4)
        token += 4
    if token_stop - token >= 2:
        results2 = avx2_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 2)
        _store(out, token, column, num_rows, 2, results2)
        token += 2
    if token_stop - token >= 1:
        results1 = avx2_dot(weights, position, quants, scales, token, dtype, planar, num_rows, 1)
        _store(out, token, column, num_rows, 1, results1)


@njit(**_FAST)
def _avx2_rows(weights, addressing, row_start, row_stop, quants, scales, out, out_base, dtype, planar):  # type: ignore[no-untyped-def]
    literally(dtype)
    literally(planar)
    batch = quants.shape[1]
    tile = _token_tile(quants)
    for token_start in range(0, batch, tile):
        token_stop = min(batch, token_start + tile)
        row = row_start
        while row_stop - row >= 2:
            _avx2_row_block(weights, addressing, row, 2, quants, scales, out, row - out_base, dtype, planar,
                             token_start, token_stop)
            row += 2
        if row < row_stop:
            _avx2_row_block(weights, addressing, row, 1, quants, scales, out, row - out_base, dtype, planar,
                             token_start, token_stop)


@njit(**_FAST)
def _pair_chunk(row_start, row_stop, chunk, num_chunks):  # type: ignore[no-untyped-def]
    """Rows [start, stop) of chunk `chunk` of `num_chunks` (even sizes, so row pairs stay whole)."""
    num_pairs = (row_stop - row_start + 1) // 2
    start = min(row_start + 2 * (chunk * num_pairs // num_chunks), row_stop)
    stop = min(row_start + 2 * ((chunk + 1) * num_pairs // num_chunks), row_stop)
    return start, stop


# The AVX2 entry points, one numba function per (dtype, planar): compiling all four variants
# behind one runtime code branch takes ~15 s of CPU, and an entry taking the code as a
# `literally` argument is re-dispatched by numba in Python on every call (~3 ms a call).
# Each: `out[t, r - row_start]` for rows [row_start, row_stop); `_parallel` splits the rows
# into `num_chunks` chunks (even sizes) on numba's threads.


@njit(**_FAST)
def _avx2_q4_0_planar(weights, addressing, row_start, row_stop, quants, scales, out):  # type: ignore[no-untyped-def]
    _avx2_rows(weights, addressing, row_start, row_stop, quants, scales, out, row_start, "q4_0", True)


@njit(**_FAST)
def _avx2_q4_0_native(weights, addressing, row_start, row_stop, quants, scales, out):  # type: ignore[no-untyped-def]
    _avx2_rows(weights, addressing, row_start, row_stop, quants, scales, out, row_start, "q4_0", False)


@njit(**_FAST)
def _avx2_q8_0_planar(weights, addressing, row_start, row_stop, quants, scales, out):  # type: ignore[no-untyped-def]
    _avx2_rows(weights, addressing, row_start, row_stop, quants, scales, out, row_start, "q8_0", True)


@njit(**_FAST)
def _avx2_q8_0_native(weights, addressing, row_start, row_stop, quants, scales, out):  # type: ignore[no-untyped-def]
    _avx2_rows(weights, addressing, row_start, row_stop, quants, scales, out, row_start, "q8_0", False)


@njit(parallel=True, **_FAST)
def _avx2_q4_0_planar_parallel(weights, addressing, row_start, row_stop, quants, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _avx2_rows(weights, addressing, start, stop, quants, scales, out, row_start, "q4_0", True)


@njit(parallel=True, **_FAST)
def _avx2_q4_0_native_parallel(weights, addressing, row_start, row_stop, quants, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _avx2_rows(weights, addressing, start, stop, quants, scales, out, row_start, "q4_0", False)


@njit(parallel=True, **_FAST)
def _avx2_q8_0_planar_parallel(weights, addressing, row_start, row_stop, quants, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _avx2_rows(weights, addressing, start, stop, quants, scales, out, row_start, "q8_0", True)


@njit(parallel=True, **_FAST)
def _avx2_q8_0_native_parallel(weights, addressing, row_start, row_stop, quants, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _avx2_rows(weights, addressing, start, stop, quants, scales, out, row_start, "q8_0", False)


@njit(**_FAST)
def _avx2_mxfp4_native(weights, addressing, row_start, row_stop, quants, scales, out):  # type: ignore[no-untyped-def]
    _avx2_rows(weights, addressing, row_start, row_stop, quants, scales, out, row_start, "mxfp4", False)


@njit(parallel=True, **_FAST)
def _avx2_mxfp4_native_parallel(weights, addressing, row_start, row_stop, quants, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _avx2_rows(weights, addressing, start, stop, quants, scales, out, row_start, "mxfp4", False)


# (dtype, planar) -> (one-thread entry, parallel entry taking `num_chunks` last)
AVX2_KERNELS = {
    ("q4_0", True): (_avx2_q4_0_planar, _avx2_q4_0_planar_parallel),
    ("q4_0", False): (_avx2_q4_0_native, _avx2_q4_0_native_parallel),
    ("q8_0", True): (_avx2_q8_0_planar, _avx2_q8_0_planar_parallel),
    ("q8_0", False): (_avx2_q8_0_native, _avx2_q8_0_native_parallel),
    ("mxfp4", False): (_avx2_mxfp4_native, _avx2_mxfp4_native_parallel),
}
