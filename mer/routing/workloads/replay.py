"""The replay workload: routing decisions read back from a trace file.

The trace's geometry must be the run's: a flat-pool trace (one layer of all the store's experts)
for a flat-pool run, a layered trace (the store's MoE layers x experts per layer) for a `--layered`
run, and the run's top-k. The whole trace is checked once when the workload is made, so a bad
trace fails at start-up with its line number, then it is streamed again decision by decision.
Weights are the trace's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from mer.errors import TraceError
from mer.routing.space import RoutingDecision, RoutingSpace
from mer.routing.trace import TraceHeader, count_trace_tokens, read_trace
from mer.routing.workloads.base import Workload


def _describe(layers: int, experts_per_layer: int, top_k: int) -> str:
    return f"{layers} layer(s) x {experts_per_layer} experts, top-{top_k}"


def check_trace_fits(header: TraceHeader, space: RoutingSpace, path: Path) -> None:
    """Raise TraceError naming both geometries unless the trace's decisions fit the run's space."""
    expected = TraceHeader.for_space(space)
    if header == expected:
        return
    message = (f"{path}: the trace's geometry ({_describe(header.layers, header.experts_per_layer, header.top_k)}) "
               f"does not fit this run ({_describe(expected.layers, expected.experts_per_layer, expected.top_k)})")
    if (header.layers, header.experts_per_layer) == (space.num_layers, space.experts_per_layer) and not space.layered:
        message += "; it is a layered trace: run with --layered"
    elif header.layers == 1 and header.experts_per_layer == space.num_experts and space.layered:
        message += "; it is a flat-pool trace: run without --layered"
    elif (header.layers, header.experts_per_layer) == (expected.layers, expected.experts_per_layer):
        message += f"; run with --top-k {header.top_k}"
    raise TraceError(message)


class ReplayWorkload(Workload):
    """Replays a trace's decisions in order; `num_tokens` is the trace's length."""

    name = "replay"

    def __init__(self, space: RoutingSpace, trace_path: str | Path):
        super().__init__(space)
        self.trace_path = Path(trace_path)
        header, self._num_tokens = count_trace_tokens(self.trace_path)
        check_trace_fits(header, space, self.trace_path)
        self._decisions: Iterator[RoutingDecision] = read_trace(self.trace_path)[1]

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def next_decision(self) -> RoutingDecision:
        """The trace's next decision, as recorded (weights included); StopIteration at its end."""
        return next(self._decisions)

    def _draw(self, layer: int) -> tuple[int, ...]:  # pragma: no cover - next_decision is overridden
        raise NotImplementedError
