"""The predictor's messages: what it observes on `observe.sock` (the router's routing decisions and, for
the gate predictor, hidden states), what it sends the I/O worker on `io.sock` (prefetch hints, pins,
its accuracy) and its progress reports to the router on `predictor_progress.sock` (docs/pipeline.md, "Messages").
"""

from typing import Annotated, NamedTuple

import numpy as np

from mer.errors import ProtocolError
from mer.metrics.events import LayerHintCounts
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import ArraySpec, equal_with_arrays, message


HiddenState = Annotated[np.ndarray, ArraySpec("float32", ("d_model",))]


class PrefetchHint(NamedTuple):
    """An expert the predictor expects soon; a higher score means more confident."""

    expert_id: int
    score: float


# --- io.sock: prefetch hints, pins and the predictor's accuracy -----------------------------------


@message(MessageKind.PREFETCH_HINTS)
class PrefetchHints:
    """Experts worth loading ahead of `token`, from the named predictor `source`."""

    token: int
    hints: list[PrefetchHint]
    source: str


@message(MessageKind.PREDICTOR_STATS, version=2)
class PredictorStats:
    """The cumulative hint accuracy of the named predictor `source`, as it scores itself
    (`mer.predict.accuracy`); the gate adds its accuracy per target layer."""

    source: str
    predictions: int
    top1_hits: int
    topk_found: int
    topk_observed: int
    per_layer: list[LayerHintCounts]


@message(MessageKind.PIN_SET)
class PinSet:
    """The experts predictor `source` wants pinned now, most wanted first (replaces its previous set)."""

    source: str
    expert_ids: list[int]


# --- observe.sock: routing history for the predictor ----------------------------------------------


@message(MessageKind.ROUTING_OBSERVED)
class RoutingObserved:
    """The router's routing decision for one token and MoE layer."""

    token: int
    layer: int
    expert_ids: list[int]
    weights: list[float]

    def check(self) -> None:
        if len(self.expert_ids) != len(self.weights):
            raise ProtocolError(
                f"RoutingObserved: {len(self.expert_ids)} expert_ids but {len(self.weights)} weights"
            )


@message(MessageKind.HIDDEN_OBSERVED)
class HiddenObserved:
    """The residual stream of one token at a MoE layer, after its attention (the input of that layer's
    ffn_norm), for the next-layer gate predictor; sent just before that layer's `RoutingObserved`,
    and only when the `gate` predictor is on with prefetch."""

    token: int
    layer: int
    hidden: HiddenState

    __eq__ = equal_with_arrays


# --- predictor_progress.sock: the predictor's progress, for the router's deadline ------------------


@message(MessageKind.PREDICTOR_PROGRESS)
class PredictorProgress:
    """The predictor (process `pid`) has consumed `observations` messages of `observe.sock` in its lifetime
    and is working on them: sent by its event loop every `mer.router.work_deadlines.progress_interval_s`
    while it consumes observations (or awaits a send of its hints), so a predictor spinning in a busy
    loop sends none (the router's deadline on observations it sent, `job_deadline_s`)."""

    pid: int
    observations: int
