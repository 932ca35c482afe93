"""The shared expert of a MoE block (qwen2moe, deepseek2): a SwiGLU FFN every token runs, scaled by its
own gate (qwen2moe) or not (deepseek2, whose `ffn_*_shexp` are `expert_shared_count` experts merged
into one FFN `expert_shared_count x expert_feed_forward_length` wide; llama.cpp's `build_ffn`).

Read from llama.cpp's `src/models/qwen2moe.cpp` (the "FFN shared expert" part of each block):

    gate  = sigmoid(ffn_gate_inp_shexp · x)                     one scalar per token, f32
    out   = ffn_down_shexp · (silu(ffn_gate_shexp · x) ⊙ (ffn_up_shexp · x))
    block output = (routed experts' gate-weighted sum + gate · out) + residual

where `x` is the block's ffn_norm output (the routed experts' input). llama.cpp computes the
sigmoid as `silu(g) / g`; mer does the same in float32 (`g / (1 + exp(-g)) / g`), so a gate
logit of exactly 0 gives NaN in both (and the pass refuses non-finite logits).

The shared expert is part of the dense weights: its tensors stay in the GGUF (never in the expert
store, never streamed), the router holds them resident with the other dense matrices and the RAM
budget counts them (`mer.runtime.ram_budget.dense_nbytes`: every non-expert tensor).

GGML shapes: `ffn_gate_inp_shexp` [d_model] (a vector), `ffn_gate_shexp` / `ffn_up_shexp`
[d_model, d_ff_shared], `ffn_down_shexp` [d_ff_shared, d_model].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mer.compute.swiglu import silu_gate

if TYPE_CHECKING:
    from mer.model.weights import DenseMatrix

TENSOR_NAMES = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


@dataclass(frozen=True)
class SharedExpert:
    """One block's shared expert: its gate vector and its SwiGLU matrices."""

    gate_input: DenseMatrix | None  # ffn_gate_inp_shexp as a 1 x d_model matrix (f32 in real files); None: ungated
    gate: DenseMatrix
    up: DenseMatrix
    down: DenseMatrix

    def __call__(self, normed: np.ndarray, threads: int = 1) -> np.ndarray:
        """The gated output float32 `[tokens, d_model]` for the ffn_norm outputs `normed`."""
        hidden = silu_gate(self.gate(normed, threads), self.up(normed, threads))
        if self.gate_input is None:  # deepseek2: ungated
            return self.down(hidden, threads)
        logit = self.gate_input(normed, threads)  # [tokens, 1]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scale = (logit / (np.float32(1) + np.exp(-logit))) / logit  # ggml: silu(g) / g
        return self.down(hidden, threads) * scale.astype(np.float32)


def add_shared_expert(routed: np.ndarray, shared: np.ndarray | None) -> np.ndarray:
    """The block's FFN output: the routed experts' sum plus the shared expert's, in llama.cpp's order."""
    return routed if shared is None else routed + shared
