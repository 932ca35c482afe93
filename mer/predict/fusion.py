"""The active predictors behind one interface, and their fusion into scored, attributed hints.

`PREDICTOR_NAMES` are the predictors `predictors = "markov,locality,affinity,gate"` may switch on
(`mer.config` parses the setting once, into these names). `make_predictors` builds them; each
`ActivePredictor` observes `(layer, experts)` and predicts `(expert, score)` hints for the next
`depth` decisions, at most `fanout` per step. `gate` (`mer.predict.gate`) also observes the router's
hidden states and needs a model: only a generation job has one (`check_model_for_predictors`).

`fuse(ranked, limit, weights)`: with one predictor its hints pass through unchanged (first
`limit`); with several, each hint is ranked by its expected usefulness, score x its predictor's
weight (the predictor's smoothed accuracy so far; 1 when not given); an expert keeps its most
useful hint, whose predictor becomes its source (ties: the first in `PREDICTOR_NAMES` order). The
`limit` most useful (ties by expert id) are returned with their raw scores (every predictor scores
on 0..1: a probability, a window frequency, a co-activation share), so the I/O worker's governor
weighs each by its source's recent accuracy once.

`FusedPredictors` observes, scores and fuses the predictors as the predictor process does (and the
simulator, offline): the gate's hints against the decision each names (`LayerAccuracy`), the
others' against the next decision (`AccuracyTracker`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mer.config import PREDICTOR_NAMES
from mer.errors import ConfigError
from mer.predict.accuracy import AccuracyTracker, LayerAccuracy
from mer.predict.affinity import AffinityPredictor
from mer.predict.locality import LocalityPredictor
from mer.predict.markov import MarkovPredictor
from mer.protocol import PredictorStats

GATE = "gate"  # the next-layer gate predictor: needs the model's gates and the router's hidden states

Hints = list[tuple[int, float]]


@dataclass
class ActivePredictor:
    """One switched-on predictor: its name, how it learns and how it predicts."""

    name: str
    observe: Callable[[int, list[int]], None]  # (layer, global expert ids)
    predict: Callable[[int, int], Hints]  # (fanout, depth) -> hints, best first
    model: object
    observe_hidden: Callable[[int, int, np.ndarray], None] | None = None  # (token, layer, residual): the gate


def check_model_for_predictors(names: tuple[str, ...], model: str | None, job: str) -> None:
    """A ConfigError when `gate` is switched on for a job without a model (the benchmark)."""
    if GATE in names and model is None:
        raise ConfigError(f"predictors = {','.join(names)!r}: the gate predictor applies a model's router gates "
                          f"to its hidden states, and the {job} job has no model; use gate with mer-pipeline "
                          f"generate (or up --model), replay a trace recorded with --record-hidden with "
                          f"--gate-model MODEL.gguf, or choose other predictors (--predictors markov)")


def make_predictors(names: tuple[str, ...], num_experts: int, top_k: int, *,
                    max_pinned: int = 0, gate=None) -> list[ActivePredictor]:
    """The predictors named, in `PREDICTOR_NAMES` order; `max_pinned` bounds the locality predictor's pins;
    `gate` is the `mer.predict.gate.GatePredictor` to use for `gate` (built from the model)."""
    active = []
    for name in names:
        if name == "markov":
            markov = MarkovPredictor(num_experts, top_k)
            observe = lambda layer, experts, model=markov: model.observe(experts)  # noqa: E731 (no layer)
            active.append(ActivePredictor(name, observe, markov.predict, markov))
        elif name == "locality":
            locality = LocalityPredictor(max_pinned=max_pinned)
            active.append(ActivePredictor(name, locality.observe, locality.predict, locality))
        elif name == "affinity":
            affinity = AffinityPredictor()
            active.append(ActivePredictor(name, affinity.observe, affinity.predict, affinity))
        elif name == GATE:
            if gate is None:
                raise ConfigError("predictors: 'gate' needs the model's gates (a generation job's GGUF)")
            active.append(ActivePredictor(name, gate.observe, gate.predict, gate, gate.observe_hidden))
        else:
            raise ConfigError(f"predictors: unknown predictor {name!r} (known: {', '.join(PREDICTOR_NAMES)})")
    return active


def fuse(ranked: dict[str, Hints], limit: int, weights: dict[str, float] | None = None) -> list[tuple[int, float, str]]:
    """The `limit` best fused hints `(expert, score, source)` of each predictor's hints (see the module doc)."""
    active = {name: hints for name, hints in ranked.items() if hints}
    if len(active) == 1:
        ((name, hints),) = active.items()
        return [(expert, score, name) for expert, score in hints[:limit]]
    order = {name: index for index, name in enumerate(PREDICTOR_NAMES)}
    best: dict[int, tuple[float, int, str, float]] = {}  # expert -> (usefulness, -order, source, score)
    for name, hints in active.items():
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        for expert, score in hints:
            candidate = (score * weight, -order.get(name, len(order)), name, score)
            if expert not in best or candidate[:2] > best[expert][:2]:
                best[expert] = candidate
    chosen = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
    return [(expert, score, source) for expert, (_, _, source, score) in chosen]


class FusedPredictors:
    """The active predictors, their hint accuracies and their fused hints (see the module doc)."""

    def __init__(self, predictors: list[ActivePredictor]):
        self.predictors = predictors
        self.accuracy = AccuracyTracker()
        self.layer_accuracy = LayerAccuracy()

    def observe(self, token: int, layer: int, expert_ids: list[int]) -> list[PredictorStats]:
        """Learn from one decision; the accuracy reports of the predictors whose hints it scored."""
        for predictor in self.predictors:
            predictor.observe(layer, expert_ids)
        reports = [self.accuracy.report(name) for name in self.accuracy.observe(expert_ids)]
        if self.layer_accuracy.observe(token, layer, expert_ids):
            reports.append(self.layer_accuracy.report(GATE))
        return reports

    def hints(self, fanout: int, depth: int) -> list[tuple[int, float, str]]:
        """Every predictor's hints (kept to be scored), fused into the `fanout x depth` most useful."""
        ranked = {}
        for predictor in self.predictors:
            ranked[predictor.name] = hints = predictor.predict(fanout, depth)
            if predictor.name == GATE:
                for target in predictor.model.targets:
                    self.layer_accuracy.hinted(target.token, target.layer, target.ahead, list(target.experts))
            elif hints:
                self.accuracy.hinted(predictor.name, [expert for expert, _ in hints])
        weights = {name: self.layer_accuracy.weight() if name == GATE else self.accuracy.weight(name)
                   for name in ranked}
        return fuse(ranked, fanout * depth, weights)
