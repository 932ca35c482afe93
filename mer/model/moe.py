"""The router gate of a MoE block, expert-major grouping, and the gate-weighted sum of experts.

Gating follows llama.cpp's `build_moe_ffn` (`mer.model.gating`, every routing function): for the
softmax architectures `probs = softmax(router_logits)` over all experts in float32, the top-k experts
by probability (in descending order), `weights = probs[top-k]`, then, where the architecture says so
(Mixtral as `llama`, qwen3moe; not olmoe), `weights /= max(sum(weights), 2^-14)`, and a final
`weights *= expert_weights_scale` when that key is set (not 0 or 1). For Mixtral this equals a
softmax over the top-k logits.

The experts themselves are computed by an `ExpertFn` (see `mer.model.experts`): the forward pass
groups the tokens of a block by expert (expert-major, so a prompt reads each needed expert once
per block and computes it as one batch) and hands one block's groups to it in one call.
"""

from __future__ import annotations

from collections.abc import Mapping
import numpy as np

from mer.errors import ShapeError
from mer.model.gating import SCORE_SOFTMAX, SCORE_SOFTMAX_WEIGHT, Routing, RoutingFunction, route, softmax

__all__ = ["Routing", "combine_experts", "expert_batches", "group_by_expert", "route_tokens", "softmax"]


def route_tokens(router_logits: np.ndarray, top_k: int, normalize: bool, scale: float = 0.0,
                 softmax_after_top_k: bool = False) -> Routing:
    """The routing of each token from its router logits float32 `[tokens, experts]` with a softmax over
    all experts (`mer.model.gating`); with `softmax_after_top_k` (gpt-oss) the top-k of the raw
    logits, weighted by a softmax over those k."""
    function = RoutingFunction(SCORE_SOFTMAX_WEIGHT if softmax_after_top_k else SCORE_SOFTMAX, normalize, scale)
    return route(function, router_logits, top_k)


def group_by_expert(routing: Routing) -> dict[int, np.ndarray]:
    """{expert: the token indices routed to it, ascending}, experts in ascending order."""
    groups: dict[int, np.ndarray] = {}
    for expert in np.unique(routing.experts):
        tokens = np.nonzero((routing.experts == expert).any(axis=1))[0]
        groups[int(expert)] = tokens
    return groups


def expert_batches(hidden: np.ndarray, groups: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """{expert: float32 `[tokens routed to it, d_model]`}, the inputs of one block's experts."""
    return {expert: np.ascontiguousarray(hidden[tokens]) for expert, tokens in groups.items()}


def combine_experts(
    routing: Routing, groups: Mapping[int, np.ndarray], outputs: Mapping[int, np.ndarray], d_model: int
) -> np.ndarray:
    """`sum_j weights[t, j] * expert_j(x_t)` for each token, summed in the routing order j = 0..k-1
    (as llama.cpp adds them): float32 `[tokens, d_model]`."""
    per_choice = np.zeros((routing.num_tokens, routing.experts.shape[1], d_model), dtype=np.float32)
    for expert, tokens in groups.items():
        out = np.asarray(outputs[expert], dtype=np.float32)
        if out.shape != (tokens.size, d_model):
            raise ShapeError(f"expert {expert}: output of shape {out.shape}, expected {(tokens.size, d_model)}")
        choices = np.argmax(routing.experts[tokens] == expert, axis=1)
        per_choice[tokens, choices] = out * routing.weights[tokens, choices][:, None]
    total = per_choice[:, 0]
    for choice in range(1, per_choice.shape[1]):
        total = total + per_choice[:, choice]
    return total
