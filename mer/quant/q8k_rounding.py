"""The q8_K rounding that ggml applies to the input of a K-quant (q4_K, q5_K, q6_K) matmul.

ggml's CPU backend multiplies a K-quant weight row by its input only after rounding the input to
q8_K (the K-quants' `vec_dot_type`), 256 values at a time (read from `quantize_row_q8_K_ref` in
ggml-quants.c, which the x86 build uses): in each block, `m` is the value of largest magnitude (the
first such, with its sign), `iscale = -127 / m` (float32), `q = min(127, round_half_even(iscale * x))`
as int8 and `d = 1 / iscale`; a block of zeros stays zero. The integer dot of the weight quants with
`q`, scaled by the weight scales and `d`, is then the product.

mer's K-quant kernels take a float32 input, so it is handed `q * d` (float32): the same products,
summed in another order (a float32 rounding apart), instead of the unrounded input, which differs
from llama.cpp by ~1e-2 relative in the logits of a K-quant model.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ShapeError

Q8_K_BLOCK = 256
K_QUANT_DTYPES = ("q4_k", "q5_k", "q6_k")


def round_to_q8_k(x: np.ndarray) -> np.ndarray:
    """Float32 rows `[..., n]` (n a multiple of 256) as ggml's q8_K holds them, dequantized."""
    values = np.asarray(x, dtype=np.float32)
    if values.shape[-1] % Q8_K_BLOCK:
        raise ShapeError(f"a K-quant matmul input has {values.shape[-1]} columns, not a multiple of {Q8_K_BLOCK}")
    blocks = values.reshape(-1, Q8_K_BLOCK)
    largest = blocks[np.arange(blocks.shape[0]), np.argmax(np.abs(blocks), axis=1)]  # first of largest magnitude
    zero = largest == 0
    with np.errstate(divide="ignore"):
        inverse_scale = np.where(zero, np.float32(0), np.float32(-127) / np.where(zero, np.float32(1), largest))
    inverse_scale = inverse_scale.astype(np.float32)
    quants = np.minimum(np.rint(blocks * inverse_scale[:, None]), np.float32(127))
    scale = np.where(zero, np.float32(0), np.float32(1) / np.where(zero, np.float32(1), inverse_scale))
    return (quants * scale.astype(np.float32)[:, None]).astype(np.float32).reshape(values.shape)
