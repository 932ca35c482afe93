"""A compute worker process: the `mer.compute.worker.ComputeWorker` role (SwiGLU on slot slices).

`workers.entry` spawns it as `mer-compute-<i>`; `mer.runtime.child.run_child` calls `start`,
`serve` and `close`. The kernels live in `mer.compute` and `mer.quant`.
"""

from __future__ import annotations

from mer.compute.worker import ComputeWorker

__all__ = ["ComputeWorker"]
