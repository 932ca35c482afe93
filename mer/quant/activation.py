"""Activations quantized to q8_0 per 32-block, laid out for the q4_0 / q8_0 kernels.

Like llama.cpp, the input of a q4_0, q8_0 or mxfp4 matmul is rounded to q8_0 per 32-element block:
`d = amax / 127` (stored as f16, used as the float32 value of that f16) and
`q = round_half_to_even(x * (127 / amax))` as int8 (all zero when amax is 0). This is the
rounding of llama.cpp's AVX path; the integer dot of a weight block with `q` times
`d_weight * d_activation` then gives the block's product.

`QuantizedActivation` holds a batch of such rows in the order the kernels read them. A "group"
is what one 64-byte weight load covers (4 q4_0 blocks or 2 q8_0 blocks; mxfp4 as q4_0); every row is padded
with zero blocks (d = 0) to whole groups. The tokens of a group lie side by side, so a kernel
that updates several tokens per weight group reads one contiguous run:

- `quants` uint8 `[num_groups, batch, 32 * blocks_per_group]`, each value stored as `q + 128`
  (the VNNI instruction multiplies unsigned by signed bytes; the kernels remove the offset).
  For q4_0 a group is 128 bytes, `[elements 0-15 of blocks 0,1,2,3][elements 16-31 of blocks
  0,1,2,3]`: the order of the low and high nibbles of 64 q4_0 weight bytes. For q8_0 a group is
  the 64 values of its 2 blocks in natural order.
- `block_scales` float32 `[num_groups, batch, blocks_per_group]`: d of each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.errors import ShapeError, UnsupportedDTypeError

BLOCK_SIZE = 32
BLOCKS_PER_GROUP = {"q4_0": 4, "q8_0": 2, "mxfp4": 4}  # mxfp4 packs its nibbles as q4_0 does
ACTIVATION_OFFSET = 128


@dataclass(frozen=True)
class QuantizedActivation:
    """A batch of q8_0-rounded activation rows in a weight dtype's kernel order (see module)."""

    weight_dtype: str
    num_blocks: int
    quants: np.ndarray
    block_scales: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.quants.shape[1])


def quantize_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float32 rows `[batch, n]` (n a multiple of 32) to q8_0: (int8 q [batch, n],
    float32 d [batch, n // 32])."""
    batch, length = x.shape
    blocks = x.reshape(batch, length // BLOCK_SIZE, BLOCK_SIZE)
    amax = np.abs(blocks).max(axis=2)
    scales = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    quants = np.rint(blocks * inverse[:, :, None]).astype(np.int8)
    return quants.reshape(batch, length), scales


def quantize_activation(x: np.ndarray, weight_dtype: str) -> QuantizedActivation:
    """Quantize float32 activations `[batch, n]` (or `[n]`) for a `weight_dtype` matmul."""
    if weight_dtype not in BLOCKS_PER_GROUP:
        raise UnsupportedDTypeError(
            f"q8_0 activations are made for q4_0, q8_0 or mxfp4 weights, not {weight_dtype!r}"
        )
    rows = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % BLOCK_SIZE or rows.shape[1] == 0:
        raise ShapeError(
            f"activation of shape {np.shape(x)}: the last axis must be a positive multiple of "
            f"{BLOCK_SIZE} (one q8_0 block)"
        )
    batch, length = rows.shape
    num_blocks = length // BLOCK_SIZE
    blocks_per_group = BLOCKS_PER_GROUP[weight_dtype]
    num_groups = -(-num_blocks // blocks_per_group)
    padded = np.zeros((batch, num_groups * blocks_per_group * BLOCK_SIZE), dtype=np.float32)
    padded[:, :length] = rows
    quants, block_scales = quantize_blocks(padded)
    ordered = _kernel_order(quants, weight_dtype, num_groups) ^ np.uint8(ACTIVATION_OFFSET)
    return QuantizedActivation(
        weight_dtype=weight_dtype,
        num_blocks=num_blocks,
        quants=np.ascontiguousarray(ordered.reshape(batch, num_groups, -1).transpose(1, 0, 2)),
        block_scales=np.ascontiguousarray(block_scales.reshape(batch, num_groups, -1).transpose(1, 0, 2)),
    )


def _kernel_order(quants: np.ndarray, weight_dtype: str, num_groups: int) -> np.ndarray:
    """Natural-order int8 q8_0 values `[batch, n]` as uint8 bytes in the kernel's group order."""
    as_bytes = quants.view(np.uint8)
    if weight_dtype == "q8_0":
        return as_bytes
    batch = quants.shape[0]
    grouped = as_bytes.reshape(batch, num_groups, 4, 2, BLOCK_SIZE // 2)  # block, half, element
    return grouped.transpose(0, 1, 3, 2, 4).reshape(batch, -1)
