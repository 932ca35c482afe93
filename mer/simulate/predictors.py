"""Predictors evaluated offline over a trace: the hint sources of the simulator and their accuracy.

A hint source sees every decision of the trace in order (global store ids, as the live router
reports them to the predictor process) and then names the experts to prefetch for what comes
next, best first. Names (`PREDICTOR_NAMES`):

- `none`: no prefetch (the simulator runs demand fetch only);
- `markov`, `locality`, `affinity`: the live predictors (`mer.predict`, built by
  `mer.predict.fusion.make_predictors` as `mer/predict/service.py` builds them), asked for
  `predict_fanout` hints per step for `pipeline_depth` steps ahead;
- `fused`: the three together, their hints fused as the live predictor process fuses them
  (`mer.predict.fusion.fuse`, weighted by each predictor's smoothed top-k accuracy so far).

`evaluate_predictor` scores a predictor's hints against the decision that actually follows,
independent of any cache: precision (hints that the next decision used) and coverage (the next
decision's experts that were hinted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from mer.errors import ConfigError
from mer.predict.fusion import FusedPredictors, make_predictors
from mer.metrics.stats import percent

if TYPE_CHECKING:
    from mer.simulate.simulator import ReplayTrace

PREDICTOR_NAMES = ("none", "markov", "locality", "affinity", "fused")
FUSED = ("markov", "locality", "affinity")


class HintSource(Protocol):
    """Learns from each decision and names experts to prefetch next, best first."""

    name: str

    def observe(self, layer: int, expert_ids: Sequence[int]) -> None: ...

    def hints(self) -> list[int]: ...


class LiveHints:
    """One or more of the live predictors as a hint source, fused as the predictor process fuses them."""

    def __init__(self, name: str, names: tuple[str, ...], num_experts: int, top_k: int, predict_fanout: int,
                 pipeline_depth: int):
        self.name = name
        self.fused = FusedPredictors(make_predictors(names, num_experts, top_k))
        self.predict_fanout = predict_fanout
        self.pipeline_depth = pipeline_depth

    def observe(self, layer: int, expert_ids: Sequence[int]) -> None:
        self.fused.observe(-1, layer, list(expert_ids))  # no gate: no hint names a token

    def hints(self) -> list[int]:
        return [expert for expert, _, _ in self.fused.hints(self.predict_fanout, self.pipeline_depth)]


def make_hint_source(name: str, num_experts: int, top_k: int, predict_fanout: int,
                     pipeline_depth: int) -> HintSource | None:
    """The hint source `name` (None for `none`); ConfigError naming the known predictors otherwise."""
    if name == "none":
        return None
    if name not in PREDICTOR_NAMES:
        raise ConfigError(f"unknown predictor {name!r}; known: {', '.join(PREDICTOR_NAMES)}")
    names = FUSED if name == "fused" else (name,)
    return LiveHints(name, names, num_experts, top_k, predict_fanout, pipeline_depth)


@dataclass(frozen=True)
class PredictorScore:
    """How a predictor's hints after each decision matched the next decision."""

    predictor: str
    steps_scored: int  # decisions that had a predecessor
    hints: int  # hints given, over those steps
    hinted_used: int  # hints that the next decision requested
    lookups: int  # experts requested by the scored decisions

    @property
    def precision_pct(self) -> float:
        return percent(self.hinted_used, self.hints)

    @property
    def coverage_pct(self) -> float:
        return percent(self.hinted_used, self.lookups)


def evaluate_predictor(trace: "ReplayTrace", name: str, predict_fanout: int = 2,
                       pipeline_depth: int = 1) -> PredictorScore:
    """Score predictor `name` on `trace`: its hints after decision t against decision t + 1."""
    source = make_hint_source(name, trace.num_experts, trace.header.top_k, predict_fanout, pipeline_depth)
    hints = hinted_used = lookups = 0
    previous_hints: set[int] | None = None
    for index, expert_ids in enumerate(trace.steps):
        if previous_hints is not None:
            hints += len(previous_hints)
            hinted_used += len(previous_hints.intersection(expert_ids))
            lookups += len(expert_ids)
        if source is None:
            previous_hints = set()
            continue
        source.observe(trace.step_layer(index), expert_ids)
        previous_hints = set(source.hints())
    return PredictorScore(name, max(len(trace.steps) - 1, 0), hints, hinted_used, lookups)
