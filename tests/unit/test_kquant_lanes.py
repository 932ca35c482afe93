"""The VNNI q4_K / q5_K kernel's float32 results, bit for bit, against a numpy model of its lanes.

The kernel's integer sums are exact, so only the float32 accumulation can differ between two
correct kernels, and that is what moves a model's logits in the last bits (and, with a close
top-2 margin, its greedy tokens: `tests/integration/test_llama_parity.py`). The model here is
the lane order the kernel documents (`mer.quant.kernels_kquant`): int32 lane j (16 lanes) of a
super-block holds sum over pieces p = 0..3 (64 nibbles each: the low, then the high nibbles of
quant bytes 0-31 and 32-63, then of 64-127) of scale(p, 4j) * (q . x over bytes 4j ... 4j + 3
of piece p); per super-block `acc_j = fma(float(S_j), d * d_x, acc_j)`, the mins as
`mins_k = fma(-dmin * min_k, d_x * sum(x of run k), mins_k)` over 8 lanes, and at the end each
accumulator summed by halving (lanes 0-7 + 8-15, then 0-3 + 4-7, ...), the two sums added.
The weights are unpacked here from the GGUF layout (not with mer's code); the activation is
mer's Q8_K (checked against ggml's in `test_matmul_kquant.py`). The float32 FMA is modelled
exactly: the product of two float32 is exact in float64, and the one rounding of the sum is
recovered from float64's with the sum's exact error (TwoSum).
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.compute.expert_format import MatrixSpec
from mer.quant.activation_k import K4_ORDER, quantize_activation_k
from mer.quant.matmul import matmul
from mer.quant.vector_ir import has_vnni_kernels
from tests.support.quant_helpers import random_matrix

pytestmark = pytest.mark.skipif(not has_vnni_kernels(), reason="the CPU lacks AVX-512 VNNI")

BLOCK_BYTES = {"q4_k": 144, "q5_k": 176}


def fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """float32 `a * b + c` with one rounding (to nearest, ties to even)."""
    product = float(a) * float(b)  # exact: 24 + 24 significant bits
    total = product + float(c)
    back = total - product
    error = (product - (total - back)) + (float(c) - back)  # exact: product + c = total + error
    rounded = np.float32(total)
    if error != 0.0 and float(rounded) != total:
        neighbour = np.nextafter(rounded, np.float32(np.inf if total > float(rounded) else -np.inf))
        if abs(float(neighbour) - total) == abs(total - float(rounded)):  # total is a float32 tie
            rounded = neighbour if (error > 0) == (float(neighbour) > total) else rounded
    return np.float32(rounded)


def halving_sum(values: np.ndarray) -> np.float32:
    values = values.astype(np.float32)
    while values.size > 1:
        values = (values[: values.size // 2] + values[values.size // 2 :]).astype(np.float32)
    return np.float32(values[0])


def unpack_block(block: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.float32, np.float32]:
    """(unsigned quants [256] natural order, 6-bit scales [8], 6-bit mins [8], d, dmin)."""
    d, dmin = (np.float32(block[at : at + 2].view(np.float16)[0]) for at in (0, 2))
    packed = block[4:16].astype(np.int64)
    scales = np.concatenate([packed[0:4] & 63, (packed[8:12] & 15) | ((packed[0:4] >> 6) << 4)])
    mins = np.concatenate([packed[4:8] & 63, (packed[8:12] >> 4) | ((packed[4:8] >> 6) << 4)])
    quants_bytes = block[16:144] if dtype == "q4_k" else block[48:176]
    quants = np.zeros(256, dtype=np.int64)
    for chunk in range(4):  # 32 bytes: elements 64c ... 64c + 31 (low nibbles), + 32 (high)
        raw = quants_bytes[32 * chunk : 32 * chunk + 32].astype(np.int64)
        quants[64 * chunk : 64 * chunk + 32] = raw & 15
        quants[64 * chunk + 32 : 64 * chunk + 64] = raw >> 4
    if dtype == "q5_k":
        high = block[16:48].astype(np.int64)
        for sub_block in range(8):
            quants[32 * sub_block : 32 * sub_block + 32] |= ((high >> sub_block) & 1) << 4
    return quants, scales, mins, d, dmin


def piece_elements() -> np.ndarray:
    """[4, 64]: the natural element of byte b of piece p (the low / high nibbles of 64 bytes)."""
    pieces = np.zeros((4, 64), dtype=np.int64)
    for piece in range(4):
        for byte in range(64):
            chunk = 2 * (piece // 2) + byte // 32
            pieces[piece, byte] = 64 * chunk + 32 * (piece % 2) + byte % 32
    return pieces


def model_dot(native_row: np.ndarray, dtype: str, activation, token: int) -> np.float32:  # type: ignore[no-untyped-def]
    natural = np.argsort(K4_ORDER)  # activation position of each natural element
    elements = piece_elements()
    sub_blocks = elements // 32
    lanes, mins_lanes = np.zeros(16, dtype=np.float32), np.zeros(8, dtype=np.float32)
    for block in range(activation.num_blocks):
        quants, scales, mins, d, dmin = unpack_block(native_row[block * BLOCK_BYTES[dtype] :][: BLOCK_BYTES[dtype]], dtype)
        x = activation.quants[block, token].astype(np.int64)[natural]
        d_x = activation.scales[block, token, 0]
        products = scales[sub_blocks] * quants[elements] * x[elements]  # [piece, byte]
        sums = products.reshape(4, 16, 4).sum(axis=(0, 2))  # lane j: bytes 4j ... 4j + 3 of every piece
        factor = np.float32(d * d_x)
        lanes = np.array([fma32(np.float32(sums[j]), factor, lanes[j]) for j in range(16)], dtype=np.float32)
        offsets = (mins.astype(np.float32) * np.float32(-dmin)).astype(np.float32)
        run_sums = activation.scales[block, token, 1:]
        mins_lanes = np.array([fma32(offsets[k], run_sums[k], mins_lanes[k]) for k in range(8)], dtype=np.float32)
    return np.float32(halving_sum(lanes) + halving_sum(mins_lanes))


@pytest.mark.parametrize("dtype", ["q4_k", "q5_k"])
def test_vnni_kernel_is_its_lane_model_bit_for_bit(dtype: str) -> None:
    rows, columns, batch = 5, 1024, 10  # row pairs and a single row; 8 + 2 tokens
    native = random_matrix(dtype, rows, columns, (77, rows, columns)).reshape(rows, -1)
    spec = MatrixSpec("gate", dtype, rows, columns, 0, native.size, "native")
    x = (np.random.default_rng(78).standard_normal((batch, columns)) * 3).astype(np.float32)
    out = matmul(spec, native.reshape(-1), x, kernel="vnni")
    activation = quantize_activation_k(x, dtype)
    expected = np.array([[model_dot(native[row], dtype, activation, token) for row in range(rows)]
                         for token in range(batch)], dtype=np.float32)
    assert np.abs(expected).max() > 1  # real sums
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32)), np.abs(out - expected).max()
