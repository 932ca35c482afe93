"""The next-layer gate predictor (as in mixtral-offloading): a later MoE layer's router gate, applied early.

The router sends the residual stream `h` of a token at MoE layer L (after L's attention: the input
of L's ffn_norm, known as soon as routing L is) to the predictor (`HiddenObserved`). The residual
stream changes little from one block to the next, so L+s's own gate applied to it ranks L+s's
experts well before the router gets there. For s = 1 .. `depth` (`pipeline_depth`):

    probabilities = softmax(ffn_gate_inp[L+s] @ rms_norm(h, ffn_norm[L+s]))

computed with `mer.model`'s code (`rms_norm`, the gate's `DenseMatrix` with ggml's input rounding,
the model's routing function `mer.model.gating`: softmax, or sigmoid scores with deepseek2 V3's
selection bias and grouped top-k), so that given the residual the router has at L+s it ranks exactly
as the router routes there (`MoEModel.route`: the same order, ties to the lower expert id). The hints for L+s are its
`fanout` most probable experts, as global store ids, with score = probability (0..1); the nearer
layer's hints come first. Nothing is predicted past the last MoE layer (no hints at the last one),
and a prediction needs the hidden state of the decision just observed (the same token and layer).

`GateWeights.load` reads `blk.N.ffn_gate_inp.weight` and `blk.N.ffn_norm.weight` of every MoE block
from the model's GGUF with `MoEModel.load` (the router's checks and dequantization) and keeps only
copies of those (a gate is experts x d_model: 4 KiB for the tiny model, 128 KiB f32 for Mixtral),
so the GGUF's parsed metadata and map are released.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mer.errors import ConfigError, ShapeError
from mer.model.attention import rms_norm
from mer.model.model import MoEModel, check_model_matches_store
from mer.model.gating import SCORE_SOFTMAX_WEIGHT, RoutingFunction, scores, selection_scores, softmax
from mer.model.weights import DenseMatrix
from mer.store.manifest import Manifest


@dataclass(frozen=True)
class GateLayer:
    """The router gate of one MoE layer and the norm applied before it."""

    block: int
    ffn_norm: np.ndarray  # float32 [d_model] (gpt-oss: its post_attention_norm)
    router: DenseMatrix  # ffn_gate_inp: [experts] x [d_model]
    router_bias: np.ndarray | None = None  # gpt-oss: added to the logits (the softmax keeps their order)
    selection_bias: np.ndarray | None = None  # deepseek2 V3's exp_probs_b: ranks, never weighs


@dataclass(frozen=True)
class GateWeights:
    """Every MoE layer's gate (index = MoE layer), and the norm epsilon."""

    path: str
    layers: tuple[GateLayer, ...]
    rms_norm_eps: float
    d_model: int
    num_experts: int
    routing: RoutingFunction = RoutingFunction()

    @classmethod
    def load(cls, path: str | os.PathLike, manifest: Manifest | None = None) -> "GateWeights":
        """The gates of the MoE GGUF at `path` (errors name the file and tensor); with `manifest`, the
        expert store must hold this model's experts."""
        model = MoEModel.load(path)
        if manifest is not None:
            check_model_matches_store(model, manifest, str(path))
        layers = [None] * len(model.moe_layers)
        for block, moe_layer in model.moe_layers.items():
            weights = model.weights.blocks[block]
            router = DenseMatrix.of(dataclasses.replace(weights.router.tensor, data=weights.router.tensor.data.copy()))
            bias = None if weights.router_bias is None else weights.router_bias.copy()
            selection = None if weights.selection_bias is None else weights.selection_bias.copy()
            layers[moe_layer] = GateLayer(block, weights.ffn_norm.copy(), router, bias, selection)
        hparams = model.hparams
        return cls(str(path), tuple(layers), hparams.rms_norm_eps, hparams.d_model, hparams.num_experts,
                   hparams.routing_function)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def probabilities(self, moe_layer: int, hidden: np.ndarray) -> np.ndarray:
        """Layer `moe_layer`'s gate scores float32 `[tokens, experts]` for residuals `[tokens, d_model]`: the
        routing function's scores (`mer.model.gating`: softmax probabilities, or sigmoid scores; gpt-oss,
        which weighs by a softmax over its top-k, gets the softmax over all its experts: the same order)."""
        logits = self._logits(moe_layer, hidden)
        return softmax(logits) if self.routing.score == SCORE_SOFTMAX_WEIGHT else scores(self.routing, logits)

    def _logits(self, moe_layer: int, hidden: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(hidden, dtype=np.float32))
        if rows.shape[1] != self.d_model:
            raise ShapeError(f"{self.path}: a hidden state of {rows.shape[1]} values, the model's d_model is "
                             f"{self.d_model}")
        layer = self.layers[moe_layer]
        logits = layer.router(rms_norm(rows, layer.ffn_norm, self.rms_norm_eps))
        return logits if layer.router_bias is None else logits + layer.router_bias

    def ranking(self, moe_layer: int, hidden: np.ndarray) -> list[tuple[int, float]]:
        """Every expert of `moe_layer` (ids within the layer) with its score for one residual `[d_model]`,
        in the order the router chooses them (`route`: selection bias and grouped top-k included, ties
        to the lower id; experts of the groups left out last)."""
        expert_scores = self.probabilities(moe_layer, hidden)
        selection = selection_scores(self.routing, expert_scores, self.layers[moe_layer].selection_bias)[0]
        order = np.argsort(-selection, kind="stable")
        return [(int(expert), float(expert_scores[0, expert])) for expert in order]


@dataclass(frozen=True)
class GateTarget:
    """The hints of one prediction for one later decision: (token, MoE layer), `ahead` layers on."""

    token: int
    layer: int
    ahead: int
    experts: tuple[int, ...]  # global ids, most probable first


class GatePredictor:
    """Hints a token's next MoE layers from its residual at the current one (see the module docstring)."""

    def __init__(self, weights: GateWeights, global_id: Callable[[int, int], int], min_probability: float = 0.0):
        self.weights = weights
        self.global_id = global_id  # (MoE layer, expert within it) -> store id: `Manifest.expert_id`
        self.min_probability = min_probability  # experts less probable than this are not hinted
        self.pending: tuple[int, int, np.ndarray] | None = None  # (token, layer, residual) not yet predicted from
        self.current: tuple[int, int, np.ndarray] | None = None  # the same, once its decision was observed
        self.targets: list[GateTarget] = []  # what the last `predict` hinted, per target decision

    def observe_hidden(self, token: int, layer: int, hidden: np.ndarray) -> None:
        """The residual of `token` at MoE `layer`; its decision (`observe`) follows."""
        self.pending = (token, layer, np.array(hidden, dtype=np.float32))  # a copy: `hidden` views a frame

    def observe(self, layer: int, experts: list[int]) -> None:
        """The decision at `layer`: predictions start from the residual observed for it (if any)."""
        pending, self.pending = self.pending, None
        self.current = pending if pending is not None and pending[1] == layer else None

    def predict(self, fanout: int, depth: int = 1) -> list[tuple[int, float]]:
        """The `fanout` most probable experts of each of the next `depth` MoE layers of the current
        token, nearest layer first, as (global id, probability); [] at the last layer."""
        self.targets = []
        if self.current is None:
            return []
        token, layer, hidden = self.current
        self.current = None  # one prediction per residual
        hints: list[tuple[int, float]] = []
        for ahead in range(1, depth + 1):
            target = layer + ahead
            if target >= self.weights.num_layers:
                break
            chosen = [(self.global_id(target, expert), probability)
                      for expert, probability in self.weights.ranking(target, hidden)[:fanout]
                      if probability >= self.min_probability]
            hints += chosen
            self.targets.append(GateTarget(token, target, ahead, tuple(expert for expert, _ in chosen)))
        return hints


def load_gate_predictor(model: str | None, manifest: Manifest, min_ratio: float = 0.0, *,
                        replay: bool = False) -> GatePredictor:
    """The gate predictor of a generation job's GGUF, checked against the run's expert store; it hints
    only experts at least `min_ratio` x uniform probable (`gate_min_ratio`). With `replay` (a benchmark
    replaying a trace recorded with residuals, `gate_model`), the store only needs the model's routing
    geometry (MoE layers x experts per layer): its experts may be synthetic, of any size."""
    if model is None:
        raise ConfigError("predictors: 'gate' applies a model's router gates, but this run has no model "
                          "(generation jobs: mer-pipeline generate / up --model; replays: --gate-model)")
    weights = GateWeights.load(model, None if replay else manifest)
    geometry = manifest.geometry
    if replay and (weights.num_layers, weights.num_experts) != (geometry.num_moe_layers, geometry.experts_per_layer):
        raise ConfigError(f"gate_model {model}: {weights.num_layers} MoE layers x {weights.num_experts} experts, "
                          f"the store has {geometry.num_moe_layers} x {geometry.experts_per_layer}: the replayed "
                          f"routing cannot be this model's")
    return GatePredictor(weights, manifest.expert_id, min_ratio / weights.num_experts)
