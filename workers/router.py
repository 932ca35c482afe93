"""The router process: the `mer.router.service.Router` role (the job, the dense model, the expert path).

`workers.entry` spawns it as `mer-router`; `mer.runtime.child.run_child` calls `start`, `serve` and
`close`. The jobs live in `mer.router` (`job.py`, `bench_job.py`, `generate_job.py`).
"""

from __future__ import annotations

from mer.router.service import Router

__all__ = ["Router"]
