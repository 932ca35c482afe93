"""Routing functions: which experts a token uses and with what weights, from its router logits.

As llama.cpp's `build_moe_ffn` computes them (float32 throughout):

1. scores: `softmax(logits)` over all experts, `sigmoid(logits)` (DeepSeek-V3, GLM-4.5), or the raw
   logits (`softmax_weight`, gpt-oss: the softmax comes after the top-k);
2. selection scores: the scores plus an optional per-expert bias (`exp_probs_b`, DeepSeek-V3) that
   only decides which experts are chosen, never their weights;
3. grouped top-k (DeepSeek-V3): the experts are split into `groups` equal groups in id order, each
   group is scored by the sum of its two best selection scores, only the `groups_used` best groups
   stay eligible (the others' selection scores become -inf);
4. the top-k experts by selection score (descending; ties to the lower id);
5. weights: the unbiased scores of those experts (`softmax_weight`: a softmax over their k logits),
   renormalised to sum to 1 when `normalize` (the sum clamped to at least 2^-14, as llama.cpp does),
   then times `scale` when it is set (not 0 or 1).

`RoutingFunction` holds one model's choice of these; `route` applies it, `selection_scores` gives
the ranking the gate predictor uses (steps 1-3) so that it ranks as the router routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.errors import ShapeError

SCORE_SOFTMAX = "softmax"
SCORE_SIGMOID = "sigmoid"
SCORE_SOFTMAX_WEIGHT = "softmax_weight"
SCORES = (SCORE_SOFTMAX, SCORE_SIGMOID, SCORE_SOFTMAX_WEIGHT)
WEIGHT_SUM_FLOOR = np.float32(6.103515625e-5)  # llama.cpp's clamp: the smallest normal f16
GROUP_SCORE_EXPERTS = 2  # a group's score: the sum of its best two selection scores


@dataclass(frozen=True)
class RoutingFunction:
    """How one model routes (see the module docstring)."""

    score: str = SCORE_SOFTMAX
    normalize: bool = False
    scale: float = 0.0  # 0 or 1: the weights are not scaled
    groups: int = 1
    groups_used: int = 1

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"routing score {self.score!r} is not one of {SCORES}")


@dataclass(frozen=True)
class Routing:
    """The experts each token uses in one block: ids int64 `[tokens, k]` (descending selection
    score) and their gate weights float32 `[tokens, k]`."""

    experts: np.ndarray
    weights: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Float32 softmax over the last axis (max subtracted; sum accumulated in float64)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Float32 `1 / (1 + exp(-x))`, as ggml's sigmoid."""
    with np.errstate(over="ignore"):
        return (np.float32(1) / (np.float32(1) + np.exp(-logits))).astype(np.float32)


def scores(function: RoutingFunction, logits: np.ndarray) -> np.ndarray:
    """Step 1: float32 `[tokens, experts]`."""
    if function.score == SCORE_SOFTMAX:
        return softmax(logits)
    if function.score == SCORE_SIGMOID:
        return sigmoid(logits)
    return logits


def selection_scores(function: RoutingFunction, expert_scores: np.ndarray,
                     selection_bias: np.ndarray | None = None) -> np.ndarray:
    """Steps 2-3: the scores experts are chosen by; experts of the groups left out are -inf."""
    selection = expert_scores if selection_bias is None else expert_scores + selection_bias
    if function.groups <= 1:
        return selection
    num_tokens, num_experts = selection.shape
    if num_experts % function.groups or not 1 <= function.groups_used <= function.groups:
        raise ShapeError(f"{num_experts} experts cannot be split into {function.groups} groups with "
                         f"{function.groups_used} used")
    grouped = selection.reshape(num_tokens, function.groups, num_experts // function.groups)
    best = -np.sort(-grouped, axis=2, kind="stable")[:, :, :GROUP_SCORE_EXPERTS]
    group_scores = best[:, :, 0]
    for column in range(1, best.shape[2]):
        group_scores = group_scores + best[:, :, column]
    kept = np.argsort(-group_scores, axis=1, kind="stable")[:, :function.groups_used]
    eligible = np.zeros((num_tokens, function.groups), dtype=bool)
    np.put_along_axis(eligible, kept, True, axis=1)
    masked = np.where(eligible[:, :, None], grouped, np.float32(-np.inf))
    return masked.reshape(num_tokens, num_experts).astype(np.float32)


def route(function: RoutingFunction, router_logits: np.ndarray, top_k: int,
          selection_bias: np.ndarray | None = None) -> Routing:
    """The routing of each token from its router logits float32 `[tokens, experts]` (steps 1-5)."""
    logits = np.atleast_2d(np.asarray(router_logits, dtype=np.float32))
    if not 1 <= top_k <= logits.shape[1]:
        raise ShapeError(f"top_k {top_k} must be in 1..{logits.shape[1]} (the experts of the block)")
    expert_scores = scores(function, logits)
    selection = selection_scores(function, expert_scores, selection_bias)
    experts = np.argsort(-selection, axis=1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(expert_scores, experts, axis=1)
    if function.score == SCORE_SOFTMAX_WEIGHT:
        weights = softmax(weights)
    if function.normalize:
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True, dtype=np.float32), WEIGHT_SUM_FLOOR)
    if function.scale not in (0.0, 1.0):
        weights = weights * np.float32(function.scale)
    return Routing(experts.astype(np.int64), weights.astype(np.float32))
