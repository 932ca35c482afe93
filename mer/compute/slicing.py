"""How an expert's d_ff is cut into slices for the compute workers, and which worker computes which.

The slices depend only on the expert format and the `expert_slices` setting (never on the worker
count): at most `expert_slices` slices of at least `MIN_SLICE_ROWS` rows, each a multiple of the
format's `slice_quantum` (the lcm of the matrices' block sizes), the last one possibly shorter.
Every slice costs: a kernel call has a fixed cost of some 0.1 ms (which dominates slices of small
experts), and a slice's down projection reads only part of each row of the down matrix, so the
kernel's per-row work is spread over fewer blocks. One worker's half of two Mixtral q4_0 experts
(batch 1, 1 thread, shared memory) takes 10.5 ms as one whole expert, 13.1 ms in 2 slices, 14.7 ms
in 4 and 25.0 ms in 16 (docs/performance.md). Worker `w` of `N` computes slices `w, w+N, ...`.
The router sums each expert's partials in slice order (`mer.compute.batches`), so the output is
bit-identical for any N. So a model keeps at most as many workers busy as its experts have slices
(`workers_with_work`): a worker beyond that is never sent a job.
"""

from __future__ import annotations

from collections.abc import Iterable

from mer.compute.expert_format import ExpertFormat, round_up
from mer.protocol import SliceRange

DEFAULT_SLICES = 2  # the `expert_slices` setting's default
MIN_SLICE_ROWS = 256


def plan_slices(expert_format: ExpertFormat, max_slices: int = DEFAULT_SLICES) -> list[SliceRange]:
    """The fixed d_ff slices of an expert format: at most `max_slices` (the `expert_slices` setting)."""
    if max_slices < 1:
        raise ValueError(f"expert_slices must be at least 1, got {max_slices}")
    quantum = expert_format.slice_quantum
    size = max(round_up(MIN_SLICE_ROWS, quantum), round_up(-(-expert_format.d_ff // max_slices), quantum))
    return [SliceRange(start, min(start + size, expert_format.d_ff)) for start in range(0, expert_format.d_ff, size)]


def workers_with_work(expert_formats: Iterable[ExpertFormat], max_slices: int = DEFAULT_SLICES) -> int:
    """How many compute workers a model's experts give work to: the most d_ff slices of any layer's
    format (worker `w` computes slices `w, w+N, ...`, so workers past the slice count stay idle)."""
    counts = [len(plan_slices(expert_format, max_slices)) for expert_format in expert_formats]
    if not counts:
        raise ValueError("a model without expert layers gives no compute worker any work")
    return max(counts)


def slices_of_worker(num_slices: int, worker: int, num_workers: int) -> list[int]:
    """Indices of the slices computed by `worker` (round robin)."""
    return list(range(worker, num_slices, num_workers))
