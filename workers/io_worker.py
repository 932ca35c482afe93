"""The I/O worker process: the `mer.io.service.IoService` role, built from the child's context.

`workers.entry` spawns it as `mer-io`; `mer.runtime.child.run_child` calls `start`, `serve` and
`close`. Everything the I/O worker does (leases, reads, prefetch admission, statistics) lives in
`mer.io` (`service`, `lease_requests`, `slot_reads`, `predictor_advice`, `restart_fence`) and `mer.cache`.
"""

from __future__ import annotations

from mer.io.service import IoService


class IoWorker(IoService):
    def __init__(self, context):
        super().__init__(context.config, context.run, context.log, context.zmq)
