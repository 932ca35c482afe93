"""The SwiGLU expert FFN computed on an expert's stored bytes.

    out = down · (silu(gate · x) ⊙ (up · x))

(or, for formats with biases and another activation, such as gpt-oss's,
`down · act(gate · x + b_gate, up · x + b_up) + b_down`, the down bias added to the partial of
the slice that starts at 0, so that the partials still sum to the output)

with gate, up (`d_ff x d_model`) and down (`d_model x d_ff`) read in place from an
`ExpertPayload` (any supported dtype and layout, see `mer.quant.matmul`). A `d_ff_slice` `s`
restricts the hidden units to `s`: the result is the partial output `down[:, s] · h[s]`, which
reads only the gate/up rows `s` and the down columns `s`; the partials of consecutive slices
summed in order equal the full output up to float32 rounding. For q4_0/q8_0 matrices the inputs
of gate/up (x) and of down (h) are rounded to q8_0 per 32-block, as llama.cpp does; since the
slice ends are multiples of `slice_quantum` (a multiple of 32), a slice quantizes exactly the
same h blocks as the full computation. With `ggml_rounding=True` the inputs of f16 / bf16
matrices are also rounded to f16 / bf16 first, and those of K-quant matrices to q8_K per 256-block
(a K-quant slice is a multiple of 256, so again the same blocks), as ggml does
(`round_float_activation`): what the model's forward pass uses for parity with llama.cpp.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ShapeError
from mer.compute.expert_activation import activate, silu_gate
from mer.compute.expert_format import ExpertPayload
from mer.quant.matmul import matmul, prepare_activation, round_float_activation


__all__ = ["silu_gate", "swiglu_expert"]


def _checked_slice(d_ff_slice: slice | None, d_ff: int, quantum: int) -> slice:
    if d_ff_slice is None:
        return slice(0, d_ff)
    start = 0 if d_ff_slice.start is None else d_ff_slice.start
    stop = d_ff if d_ff_slice.stop is None else d_ff_slice.stop
    if d_ff_slice.step not in (None, 1) or not 0 <= start < stop <= d_ff or start % quantum or stop % quantum:
        raise ShapeError(
            f"d_ff_slice {d_ff_slice} must be a non-empty step-1 range inside 0..{d_ff} whose "
            f"start and stop are multiples of the slice quantum {quantum}"
        )
    return slice(start, stop)


def _checked_tokens(x: np.ndarray, d_model: int) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim not in (1, 2) or array.shape[-1] != d_model or not np.issubdtype(array.dtype, np.floating):
        raise ShapeError(
            f"expert input must be float32 of shape ({d_model},) or (batch, {d_model}), got "
            f"{array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(np.atleast_2d(array), dtype=np.float32)


def _rounded(dtype: str, values: np.ndarray, ggml_rounding: bool) -> np.ndarray:
    return round_float_activation(dtype, values) if ggml_rounding else values


def swiglu_expert(
    payload: ExpertPayload,
    x: np.ndarray,
    d_ff_slice: slice | None = None,
    *,
    threads: int | None = None,
    ggml_rounding: bool = False,
) -> np.ndarray:
    """The expert's output (or, with `d_ff_slice`, its partial output) for one token
    (`x` of shape `(d_model,)`) or a batch (`(batch, d_model)`), float32 of the same shape.
    `ggml_rounding` rounds the inputs of f16/bf16 matrices as ggml does (see the module)."""
    expert_format = payload.format
    hidden = _checked_slice(d_ff_slice, expert_format.d_ff, expert_format.slice_quantum)
    tokens = _checked_tokens(x, expert_format.d_model)
    num_threads = 1 if threads is None else threads
    gate, up, down = expert_format.gate, expert_format.up, expert_format.down
    gate_dtype, up_dtype, down_dtype = (matrix.dtype_info.name for matrix in (gate, up, down))
    gate_input = prepare_activation(gate_dtype, _rounded(gate_dtype, tokens, ggml_rounding))
    up_input = (
        gate_input
        if up_dtype == gate_dtype
        else prepare_activation(up_dtype, _rounded(up_dtype, tokens, ggml_rounding))
    )
    gate_out = matmul(gate, payload.matrix_bytes(gate), gate_input, rows=hidden, threads=num_threads)
    up_out = matmul(up, payload.matrix_bytes(up), up_input, rows=hidden, threads=num_threads)
    biases = payload.biases()
    if biases is not None:
        gate_out, up_out = gate_out + biases[0][hidden], up_out + biases[1][hidden]
    hidden_values = _rounded(down_dtype, activate(expert_format.activation, gate_out, up_out), ggml_rounding)
    out = matmul(down, payload.matrix_bytes(down), hidden_values, columns=hidden, threads=num_threads)
    if biases is not None and hidden.start == 0:  # the down bias once per expert: in the first slice's partial
        out = out + biases[2]
    return out[0] if np.ndim(x) == 1 else out
