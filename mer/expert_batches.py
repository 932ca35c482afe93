"""Expert-major token batches of one MoE block, as the process graph computes them.

A MoE block hands each chosen expert the rows of the tokens routed to it (`{expert: x [n, d_model]}`,
see `mer.model.moe.expert_batches`). In the graph these batches travel to the compute workers in
one `ExpertBatchJob` per worker: the batches laid end to end in one array `x` (expert order), with
`row_offsets` marking where each expert's rows start, and the d_ff slices of `mer.slicing` split
between the workers as for the benchmark (slice `s` on worker `s % N`).

- router: `pack_batches` lays the batches out; `expert_outputs` turns the gathered partials
  `[slices, rows, d_model]` into each expert's output, summing its slice partials in slice order in
  float32, so the result does not depend on the worker count or on which experts share a job;
- worker: `item_partials` computes the partials of one expert on its rows with llama.cpp's input
  rounding (`swiglu_expert(..., ggml_rounding=True)`), as the single-process model does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mer.errors import ShapeError
from mer.expert_format import ExpertPayload
from mer.protocol import SliceRange
from mer.swiglu import swiglu_expert


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
    outputs = {}
    for index, expert in enumerate(packed.experts):
        rows = packed.rows_of(index)
        total = partials[0, rows].copy()
        for slice_index in range(1, partials.shape[0]):
            total += partials[slice_index, rows]
        outputs[expert] = total
    return outputs


def item_partials(payload: ExpertPayload, x: np.ndarray, slices: Sequence[SliceRange], threads: int = 1) -> np.ndarray:
    """Partial outputs `[len(slices), rows, d_model]` of one expert on its token rows `x`."""
    out = np.empty((len(slices), x.shape[0], x.shape[1]), dtype=np.float32)
    for index, (start, stop) in enumerate(slices):
        out[index] = swiglu_expert(payload, x, slice(start, stop), threads=threads, ggml_rounding=True)
    return out
