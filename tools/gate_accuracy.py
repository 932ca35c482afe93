"""Next-layer gate accuracy on held-out text: what mer's gate predictor would hint, against the routing.

One forward pass per window (mer's `ForwardPass`, experts from the GGUF) with an observer that keeps,
per MoE layer, each token's post-attention residual (the input of the layer's ffn_norm: what the router
sends the predictor as `HiddenObserved`) and its routing decision. The decisions are then replayed
token by token, layer by layer, into mer's own predictor code exactly as the predictor process handles
a generation's observations (`mer/predict/service.py`): `observe_hidden`, then `FusedPredictors.observe`
(which scores the hints made for this decision), then `FusedPredictors.hints(fanout, depth=1)` (which
predicts layer L+1 from layer L's residual with `GatePredictor`). The counts come from mer's
`LayerAccuracy`: per target layer L+1, top-1 (the most probable hinted expert is one of the k chosen)
and top-k (of the k chosen experts, how many are among the k best hints) accuracy, as `generate`'s
`experts:` line reports them. `min_ratio` is `gate_min_ratio` (experts less probable than
min_ratio / experts are not hinted; a decision with no hint finds nothing): 0 scores the gate's pure
ranking, the configuration's default (1.5) what a generation run prefetches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mer.metrics.events import LayerHintCounts
from mer.model.experts import GGUFExperts
from mer.model.forward import ForwardPass, MoEBlockCosts, in_process, run_inline
from mer.model.model import MoEModel
from mer.model.moe import Routing
from mer.predict.fusion import GATE, FusedPredictors, make_predictors
from mer.predict.gate import GatePredictor, GateWeights


@dataclass
class RecordedPass:
    """What one forward pass showed: per MoE layer, the residuals [tokens, d_model] and experts [tokens, k]."""

    logits: np.ndarray
    residuals: dict[int, np.ndarray] = field(default_factory=dict)
    experts: dict[int, np.ndarray] = field(default_factory=dict)
    weights: dict[int, np.ndarray] = field(default_factory=dict)


class RoutingRecorder:
    """A `ForwardObserver` keeping each MoE layer's residuals and routing of a pass."""

    def __init__(self) -> None:
        self.residuals: dict[int, np.ndarray] = {}
        self.routings: dict[int, Routing] = {}

    async def routed(self, moe_layer: int, positions: np.ndarray, residual: np.ndarray, routing: Routing) -> None:
        self.residuals[moe_layer] = np.array(residual, dtype=np.float32)
        self.routings[moe_layer] = routing

    async def block_done(self, costs: MoEBlockCosts) -> None:
        pass


def recorded_pass(model: MoEModel, window: np.ndarray, experts: GGUFExperts | None = None) -> RecordedPass:
    """Run `window` (from an empty KV cache, logits for every position) and record its routing."""
    recorder = RoutingRecorder()
    forward_pass = ForwardPass(model, in_process(experts or GGUFExperts(model.source)), observer=recorder)
    result = run_inline(forward_pass(window, model.new_kv_cache(len(window)), all_logits=True))
    return RecordedPass(result.logits, recorder.residuals,
                        {layer: np.asarray(routing.experts) for layer, routing in recorder.routings.items()},
                        {layer: np.asarray(routing.weights) for layer, routing in recorder.routings.items()})


@dataclass(frozen=True)
class LayerGateAccuracy:
    """The gate's next-layer hints for one target MoE layer: mer's counts and accuracies."""

    counts: LayerHintCounts

    @property
    def layer(self) -> int:
        return self.counts.layer

    def to_json_dict(self) -> dict:
        return self.counts.to_summary_dict()


def gate_accuracy(weights: GateWeights, passes: list[RecordedPass], *, min_ratio: float = 0.0,
                  fanout: int | None = None) -> list[LayerGateAccuracy]:
    """Per target MoE layer (1 .. last), the gate predictor's next-layer accuracy over `passes` (see the
    module docstring); `fanout` defaults to the decisions' size k."""
    num_experts = weights.num_experts
    global_id = lambda layer, expert: layer * num_experts + expert  # noqa: E731 (a store's layer-major ids)
    gate = GatePredictor(weights, global_id, min_ratio / num_experts)
    fused = FusedPredictors(make_predictors((GATE,), num_experts * weights.num_layers, 0, gate=gate))
    token = 0
    for recorded in passes:
        layers = sorted(recorded.experts)
        if layers != list(range(weights.num_layers)):
            raise ValueError(f"a recorded pass has MoE layers {layers}, the gates {weights.num_layers}")
        top_k = recorded.experts[0].shape[1]
        for position in range(recorded.experts[0].shape[0]):
            for layer in layers:
                gate.observe_hidden(token, layer, recorded.residuals[layer][position])
                fused.observe(token, layer, [global_id(layer, int(e)) for e in recorded.experts[layer][position]])
                fused.hints(fanout or top_k, 1)
            token += 1
    report = fused.layer_accuracy.report(GATE)
    return [LayerGateAccuracy(counts) for counts in report.per_layer]
