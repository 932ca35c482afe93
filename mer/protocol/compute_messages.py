"""The compute workers' messages on `compute.sock` (docs/pipeline.md, "Messages"): SwiGLU on slot
payloads, its partial outputs and its progress.

Weights never travel in messages: compute work names slots by `(expert_id, slot, generation)`.
"""

from typing import Annotated, NamedTuple

import numpy as np

from mer.errors import ProtocolError
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import ArraySpec, equal_with_arrays, message


Activations = Annotated[np.ndarray, ArraySpec("float32", ("batch", "d_model"))]
BatchPartials = Annotated[np.ndarray, ArraySpec("float32", ("slices", "rows", "d_model"))]


class ComputeItem(NamedTuple):
    """One expert of a compute job: where its payload lies and which MoE layer it belongs to."""

    expert_id: int
    slot: int
    generation: int
    moe_layer: int


class SliceRange(NamedTuple):
    """A half-open range `[start, stop)` of d_ff rows."""

    start: int
    stop: int


# --- compute.sock: SwiGLU on slot payloads --------------------------------------------------------


@message(MessageKind.EXPERT_BATCH_JOB)
class ExpertBatchJob:
    """Compute the assigned d_ff slices of every item (an expert in a slot) on the item's own rows of `x`.

    The one compute message: a model's MoE block sends the tokens routed to each expert, the
    benchmark one synthetic hidden state per expert. Item `i` is computed on the rows
    `x[row_offsets[i]:row_offsets[i + 1]]` (expert-major); `row_offsets` has one entry more than
    `items`, starts at 0, grows strictly and ends at the number of rows of `x`."""

    job_id: int
    items: list[ComputeItem]
    slices: list[SliceRange]
    x: Activations
    row_offsets: list[int]

    __eq__ = equal_with_arrays

    def check(self) -> None:
        for index, (start, stop) in enumerate(self.slices):
            if not 0 <= start < stop:
                raise ProtocolError(f"ExpertBatchJob.slices[{index}]: [{start}, {stop}) is not a non-empty range")
        offsets, rows = self.row_offsets, self.x.shape[0]
        if len(offsets) != len(self.items) + 1 or offsets[0] != 0 or offsets[-1] != rows:
            raise ProtocolError(f"ExpertBatchJob.row_offsets {offsets[:8]}... must have {len(self.items) + 1} "
                                f"entries from 0 to the {rows} rows of x")
        if any(stop <= start for start, stop in zip(offsets, offsets[1:])):
            raise ProtocolError(f"ExpertBatchJob.row_offsets {offsets[:8]}... must grow strictly (each item has rows)")


@message(MessageKind.EXPERT_BATCH_RESULT)
class ExpertBatchResult:
    """The partial outputs of an `ExpertBatchJob`: one d_model vector per (assigned slice, row of x)."""

    job_id: int
    worker: int
    partials: BatchPartials
    compute_us: float

    __eq__ = equal_with_arrays


@message(MessageKind.JOB_PROGRESS)
class JobProgress:
    """A compute worker is still working on job `job_id`: `items_done` of its items are computed. Sent
    between items at most every `mer.router.work_deadlines.progress_interval_s` while a job runs (the
    router's per-job deadline, `job_deadline_s`, restarts at each)."""

    job_id: int
    worker: int
    items_done: int
