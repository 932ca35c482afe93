"""The whole forward pass over a batch of new tokens (a prompt or one decode step).

Each block: attention with the KV cache, then the FFN: for a MoE block the tokens are routed,
grouped by expert (expert-major: every token routed to the same expert is computed in one batch,
so a prompt needs each chosen expert once per block), the block's groups are handed to the
`ExpertFn` in ONE call, and the outputs are summed with the gate weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mer.model.attention import KVCache, next_positions
from mer.model.experts import ExpertFn
from mer.model.model import MoEModel
from mer.model.moe import Routing, combine_experts, expert_batches, group_by_expert


@dataclass
class ForwardResult:
    """Logits float32 `[tokens, vocab]` (or `[1, vocab]`, the last token's, when not all were
    asked for) and the routing of every MoE block, by block index."""

    logits: np.ndarray
    routings: dict[int, Routing] = field(default_factory=dict)


def moe_ffn(model: MoEModel, block: int, normed: np.ndarray, expert_fn: ExpertFn) -> tuple[np.ndarray, Routing]:
    """The gate-weighted expert output of a MoE block for `normed` (ffn_norm output) and its routing."""
    routing = model.route(block, normed)
    groups = group_by_expert(routing)
    outputs = expert_fn(model.moe_layers[block], expert_batches(normed, groups))
    return combine_experts(routing, groups, outputs, model.hparams.d_model), routing


def forward_block(
    model: MoEModel, block: int, hidden: np.ndarray, kv_cache: KVCache, positions: np.ndarray, expert_fn: ExpertFn
) -> tuple[np.ndarray, Routing | None]:
    """One transformer block: hidden states in, hidden states out (and the block's routing)."""
    hidden = model.attention_block(block, hidden, kv_cache, positions)
    normed = model.ffn_input(block, hidden)
    if not model.is_moe_block(block):
        return hidden + model.dense_ffn(block, normed), None
    expert_out, routing = moe_ffn(model, block, normed, expert_fn)
    return hidden + expert_out, routing


def forward(
    model: MoEModel,
    token_ids: Sequence[int] | np.ndarray,
    kv_cache: KVCache,
    expert_fn: ExpertFn,
    *,
    all_logits: bool = True,
) -> ForwardResult:
    """Run new tokens (continuing the sequence in `kv_cache`) through the model."""
    hidden = model.embed(token_ids)
    positions = next_positions(kv_cache, 0, hidden.shape[0])
    routings: dict[int, Routing] = {}
    for block in range(model.hparams.num_blocks):
        hidden, routing = forward_block(model, block, hidden, kv_cache, positions, expert_fn)
        if routing is not None:
            routings[block] = routing
    if not all_logits:
        hidden = hidden[-1:]
    return ForwardResult(model.logits(hidden), routings)
