"""Expert-major batches of rows, as the process graph computes them (the one compute message).

Each chosen expert gets its own rows: in generation the tokens routed to it by a MoE block
(`{expert: x [n, d_model]}`, see `mer.model.moe.expert_batches`), in the benchmark one synthetic
hidden state. The batches travel to the compute workers in one `ExpertBatchJob` per worker: laid
end to end in one array `x` (expert order), with `row_offsets` marking where each expert's rows
start, and the d_ff slices of `mer.compute.slicing` split between the workers (slice `s` on worker `s % N`).

- router: `pack_batches` lays the batches out; `expert_outputs` turns the gathered partials
  `[slices, rows, d_model]` into each expert's output, summing its slice partials in slice order in
  float32 (`sum_slices`), so the result does not depend on the worker count or on which experts
  share a job; the benchmark then adds its experts' outputs with their gate weights
  (`weighted_sum`, in the decision's order);
- worker: `item_partials` computes the partials of one expert on its rows with llama.cpp's input
  rounding (`swiglu_expert(..., ggml_rounding=True)`), as the single-process model does;
  `item_partials_in_chunks` does so `PROGRESS_CHUNK_ROWS` rows at a time, calling back between chunks
  (where the worker reports its progress), with the very same bits: the kernels compute each row
  independently of the others in its call (tests/unit/test_batch_invariance.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mer.errors import ShapeError
from mer.compute.expert_format import ExpertPayload
from mer.protocol import SliceRange
from mer.compute.swiglu import swiglu_expert


# Rows of one expert computed between two progress reports of a compute worker. The router's deadline
# (`job_deadline_s`, default 8 s, `mer.router.work_deadlines`) must never see one chunk as a stall: a
# Mixtral-sized expert (d_model 4096, d_ff 14336, q4_0) takes about 2.5 ms per row on the 2-core
# development machine unloaded; at 10x that under load, 32 rows take 0.8 s, a tenth of the default
# deadline, whatever the prefill batch. Measured with tools/bench_progress_chunks.py (one kernel thread,
# load average 5-6): one chunk of 32 rows 0.08-0.12 s (q4_0, q4_k/q6_k); chunked / one call 0.69-1.22
# for items of 32-512 rows (no cost above the noise: a few dozen rows fill the kernels' row tiles).
PROGRESS_CHUNK_ROWS = 32


@dataclass(frozen=True)
class PackedBatches:
    """Per-expert token batches laid end to end: expert `experts[i]` owns rows `row_offsets[i]:row_offsets[i+1]`."""

    experts: tuple[int, ...]
    row_offsets: tuple[int, ...]
    x: np.ndarray  # float32 [rows, d_model]

    def rows_of(self, index: int) -> slice:
        return slice(self.row_offsets[index], self.row_offsets[index + 1])


def pack_batches(batches: Mapping[int, np.ndarray], experts: Sequence[int] | None = None) -> PackedBatches:
    """Lay out the batches of `experts` (default: all, in the mapping's order) as one array."""
    chosen = tuple(batches) if experts is None else tuple(experts)
    if not chosen:
        raise ShapeError("an expert batch job needs at least one expert")
    arrays = [np.asarray(batches[expert], dtype=np.float32) for expert in chosen]
    if any(array.ndim != 2 or array.shape[0] == 0 for array in arrays):
        raise ShapeError(f"every expert batch must be a non-empty [tokens, d_model] array, got "
                         f"{[array.shape for array in arrays]}")
    offsets = np.concatenate([[0], np.cumsum([array.shape[0] for array in arrays])])
    return PackedBatches(chosen, tuple(int(offset) for offset in offsets), np.concatenate(arrays, axis=0))


def expert_outputs(packed: PackedBatches, partials: np.ndarray) -> dict[int, np.ndarray]:
    """{expert: output [rows, d_model]}: the sum of its slice partials `[slices, rows, d_model]`, slice by slice."""
    if partials.ndim != 3 or partials.shape[1:] != packed.x.shape:
        raise ShapeError(f"partials of shape {partials.shape} do not fit {packed.x.shape[0]} rows of "
                         f"{packed.x.shape[1]} (expected [slices, rows, d_model])")
    return {expert: sum_slices(partials[:, packed.rows_of(index)]) for index, expert in enumerate(packed.experts)}


def sum_slices(partials: np.ndarray) -> np.ndarray:
    """One expert's output: its slice partials `[slices, rows, d_model]` added in slice order, in float32."""
    total = partials[0].copy()
    for index in range(1, partials.shape[0]):
        total += partials[index]
    return total


def weighted_sum(outputs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """`sum_i weights[i] * outputs[i]`, added in the given order in float32 (the benchmark's combine)."""
    total = np.zeros_like(outputs[0], dtype=np.float32)
    for output, weight in zip(outputs, weights, strict=True):
        total += np.float32(weight) * output
    return total


def item_partials(payload: ExpertPayload, x: np.ndarray, slices: Sequence[SliceRange], threads: int = 1) -> np.ndarray:
    """Partial outputs `[len(slices), rows, d_model]` of one expert on its token rows `x`."""
    out = np.empty((len(slices), x.shape[0], x.shape[1]), dtype=np.float32)
    for index, (start, stop) in enumerate(slices):
        out[index] = swiglu_expert(payload, x, slice(start, stop), threads=threads, ggml_rounding=True)
    return out


def item_partials_in_chunks(payload: ExpertPayload, x: np.ndarray, slices: Sequence[SliceRange], threads: int,
                            out: np.ndarray, before_chunk: Callable[[int], None],
                            chunk_rows: int = PROGRESS_CHUNK_ROWS) -> None:
    """`item_partials` written into `out` (`[len(slices), rows, d_model]`), `chunk_rows` rows at a time;
    `before_chunk(rows)` is called before each chunk with its row count. Bit-identical to one call on all
    rows (the kernels are batch-invariant)."""
    if chunk_rows < 1:
        raise ShapeError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, min(start + chunk_rows, x.shape[0]))
        before_chunk(rows.stop - rows.start)
        out[:, rows] = item_partials(payload, x[rows], slices, threads)
