"""Activations quantized to Q8_K per 256-element super-block, laid out for the K-quant kernels.

llama.cpp rounds the input of a q4_K, q5_K or q6_K matmul to Q8_K (ggml's `vec_dot_type` of
the K-quants), and so does mer. Per 256-element super-block: `max` is the element of largest
magnitude (the first one on ties), `iscale = -127 / max` (float32), `q = min(127,
round_half_to_even(iscale * x))` as int8, `d = 1 / iscale` (float32, not f16) and the
sixteen 16-element sums of `q` (int16); all zero, d = 0, when the block is zero. This is
bit for bit what the `quantize_row_q8_K` of the llama.cpp bundled with llama-cpp-python
computes (checked in `tests/unit/test_matmul_kquant.py`).

`SuperBlockActivation` holds a batch of such rows in the order the kernels read them, the
tokens of one super-block side by side:

- `quants` int8 `[num_blocks, batch, 256]`: for q6_K the natural element order; for q4_K and
  q5_K (`K4_ORDER`) the order of the nibbles of 64 packed bytes (the low nibbles of quant
  bytes 0-63 hold elements 0-31 and 64-95, the high nibbles 32-63 and 96-127: two 64-element
  PIECES per 128-element half), with the 4-byte runs of a half's two pieces interleaved: per
  16-byte lane k, the first 64 bytes hold runs (piece 0, run 4k), (1, 4k), (0, 4k + 1),
  (1, 4k + 1), the next 64 bytes runs 4k + 2 and 4k + 3 likewise (`vpunpckldq` /
  `vpunpckhdq` of the two pieces). The VNNI kernel's `vpdpbusd` run sums of the two vectors,
  packed to int16 by `vpackssdw`, then line up the two pieces' runs of one int32 lane in
  adjacent words, so one `vpdpwssd` scales both (see `kernels_kquant`);
- `sums` int16 `[num_blocks, batch, 16]`: the sums of natural elements 16k ... 16k + 15;
- `scales` float32 `[num_blocks, batch, 9]`: d, then for each 32-element run j (natural
  elements 32j ... 32j + 31) `d * (its sum of q)` in float32, what the q4_K / q5_K mins
  multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.errors import ShapeError, UnsupportedDTypeError

SUPER_BLOCK = 256
SUM_SPAN = 16
K_QUANT_DTYPES = ("q4_k", "q5_k", "q6_k")


def k4_activation_position(element):  # type: ignore[no-untyped-def]
    """Position of natural element `element` (0..255; an int or an integer array) in a q4_K /
    q5_K activation super-block (see the module): first its place among the nibbles of 64
    packed bytes (the low nibbles of quant bytes 0-63 hold elements 0-31 and 64-95, the high
    nibbles 32-63 and 96-127; the same for 128-255), then the 4-byte runs of each half's two
    64-nibble pieces interleaved as `vpunpckldq` / `vpunpckhdq` interleave them per 16-byte lane.
    Plain integer arithmetic: the portable kernel compiles it with numba."""
    chunk, nibble, index = element // 64, (element // 32) % 2, element % 32
    nibble_position = 64 * (2 * (chunk // 2) + nibble) + 32 * (chunk % 2) + index
    half, piece, byte = nibble_position // 128, (nibble_position // 64) % 2, nibble_position % 64
    run, run_byte = byte // 4, byte % 4
    lane, vector, pair = run // 4, (run % 4) // 2, run % 2
    return 128 * half + 64 * vector + 16 * lane + 4 * (2 * pair + piece) + run_byte


def _k4_order() -> np.ndarray:
    """Natural element index of each position of a q4_K / q5_K super-block's activation."""
    return np.argsort(k4_activation_position(np.arange(SUPER_BLOCK)))


K4_ORDER = _k4_order()


@dataclass(frozen=True)
class SuperBlockActivation:
    """A batch of Q8_K-rounded activation rows in a K-quant kernel's order (see module)."""

    weight_dtype: str
    num_blocks: int
    quants: np.ndarray
    sums: np.ndarray
    scales: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.quants.shape[1])


def quantize_super_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float32 rows `[batch, n]` (n a multiple of 256) to Q8_K: (int8 q [batch, n],
    float32 d [batch, n // 256])."""
    batch, length = x.shape
    blocks = x.reshape(batch, length // SUPER_BLOCK, SUPER_BLOCK)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    with np.errstate(divide="ignore"):
        inverse = np.where(largest != 0, np.float32(-127) / largest, np.float32(0)).astype(np.float32)
        scales = np.where(inverse != 0, np.float32(1) / inverse, np.float32(0)).astype(np.float32)
    quants = np.minimum(np.rint(blocks * inverse[:, :, None]), 127).astype(np.int8)
    return quants.reshape(batch, length), scales


def quantize_activation_k(x: np.ndarray, weight_dtype: str) -> SuperBlockActivation:
    """Quantize float32 activations `[batch, n]` (or `[n]`) for a `weight_dtype` K-quant matmul."""
    if weight_dtype not in K_QUANT_DTYPES:
        raise UnsupportedDTypeError(f"Q8_K activations are made for {K_QUANT_DTYPES}, not {weight_dtype!r}")
    rows = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % SUPER_BLOCK or rows.shape[1] == 0:
        raise ShapeError(
            f"activation of shape {np.shape(x)}: the last axis must be a positive multiple of "
            f"{SUPER_BLOCK} (one Q8_K super-block)"
        )
    batch, length = rows.shape
    num_blocks = length // SUPER_BLOCK
    quants, scales = quantize_super_blocks(rows)
    blocks = quants.reshape(batch, num_blocks, SUPER_BLOCK)
    sums = blocks.reshape(batch, num_blocks, SUM_SPAN, -1).sum(axis=3, dtype=np.int16)
    run_sums = sums.reshape(batch, num_blocks, 8, 2).sum(axis=3, dtype=np.int32).astype(np.float32)
    scaled_sums = np.concatenate([scales[:, :, None], scales[:, :, None] * run_sums], axis=2)
    if weight_dtype != "q6_k":
        blocks = blocks[:, :, K4_ORDER]
    return SuperBlockActivation(
        weight_dtype=weight_dtype,
        num_blocks=num_blocks,
        quants=np.ascontiguousarray(blocks.transpose(1, 0, 2)),
        sums=np.ascontiguousarray(sums.transpose(1, 0, 2)),
        scales=np.ascontiguousarray(scaled_sums.transpose(1, 0, 2)),
    )
