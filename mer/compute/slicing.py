"""How an expert's d_ff is cut into slices for the compute workers, and which worker computes which.

The slices depend only on the expert format (never on the worker count): at most
`TARGET_SLICES` slices of at least `MIN_SLICE_ROWS` rows (a kernel call has a fixed cost of some
0.1 ms, which dominates slices of small experts), each a multiple of the format's `slice_quantum`
(the lcm of the matrices' block sizes), the last one possibly shorter. Worker `w` of `N` computes slices `w, w+N, ...`.
The router sums each expert's partials in slice order (`mer.compute.batches`), so the output is
bit-identical for any N.
"""

from __future__ import annotations

from mer.compute.expert_format import ExpertFormat, round_up
from mer.protocol import SliceRange

TARGET_SLICES = 16
MIN_SLICE_ROWS = 256


def plan_slices(expert_format: ExpertFormat) -> list[SliceRange]:
    """The fixed d_ff slices of an expert format."""
    quantum = expert_format.slice_quantum
    size = max(round_up(MIN_SLICE_ROWS, quantum), round_up(-(-expert_format.d_ff // TARGET_SLICES), quantum))
    return [SliceRange(start, min(start + size, expert_format.d_ff)) for start in range(0, expert_format.d_ff, size)]


def slices_of_worker(num_slices: int, worker: int, num_workers: int) -> list[int]:
    """Indices of the slices computed by `worker` (round robin)."""
    return list(range(worker, num_slices, num_workers))
