"""How many compute workers a model's run starts when the worker count is not given (`up`'s demos).

`compute_workers = "auto"` means one worker per available core (`mer.config.resolve_for_machine`),
but the router sends work only to as many workers as an expert has d_ff slices
(`mer.compute.slicing.workers_with_work`: slices of at least `MIN_SLICE_ROWS` rows, at most
`expert_slices`). A worker beyond that never gets a job and only costs a process (its start-up,
kernel compiles, ~96 MiB) and a core's time slices. `choose_compute_workers` keeps the machine's count
unless the model gives fewer workers work; it is used only when neither a flag nor the config file
names the count. Measured on the first embedded model (d_ff 256: one slice), 2 cores: docs/pipeline.md,
"How many compute workers" (today's embedded model has d_ff 512, two slices: both workers have work).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mer.compute.expert_format import ExpertFormat
from mer.compute.slicing import MIN_SLICE_ROWS, workers_with_work
from mer.logging_setup import get_logger


@dataclass(frozen=True)
class WorkerChoice:
    """The machine's worker count (`available`), the model's (`with_work`) and the one started (`chosen`)."""

    available: int
    with_work: int
    chosen: int
    d_ff: int
    expert_slices: int

    def describe(self) -> str:
        """`1 compute worker (the cores allow 2, but the experts' d_ff 256 makes 1 slice of >= 256 rows,
        one per worker)`, or `2 compute workers` when the machine's count is kept."""
        workers = f"{self.chosen} compute worker{'s' if self.chosen != 1 else ''}"
        if self.chosen == self.available:
            return workers
        return (f"{workers} (the cores allow {self.available}, but the experts' d_ff {self.d_ff} makes "
                f"{self.with_work} slice{'s' if self.with_work != 1 else ''} of >= {MIN_SLICE_ROWS} rows, one "
                f"per worker)")


def compute_workers_for_model(available: int, expert_formats: Iterable[ExpertFormat], expert_slices: int) -> int:
    """The workers to start: the machine's `available` count, but no more than the model gives work to."""
    if available < 1:
        raise ValueError(f"available compute workers must be at least 1, got {available}")
    return min(available, workers_with_work(expert_formats, expert_slices))


def choose_compute_workers(available: int, expert_formats: Iterable[ExpertFormat], expert_slices: int) -> WorkerChoice:
    """`compute_workers_for_model` with its reasons, logged as `compute_workers_chosen`."""
    formats = list(expert_formats)
    with_work = workers_with_work(formats, expert_slices)
    choice = WorkerChoice(available=available, with_work=with_work,
                          chosen=compute_workers_for_model(available, formats, expert_slices),
                          d_ff=max(expert_format.d_ff for expert_format in formats), expert_slices=expert_slices)
    get_logger().info("compute_workers_chosen", available=choice.available, with_work=choice.with_work,
                      chosen=choice.chosen, d_ff=choice.d_ff, expert_slices=choice.expert_slices,
                      min_slice_rows=MIN_SLICE_ROWS)
    return choice
