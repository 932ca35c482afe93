"""The predictor process: the `mer.predict.service.PredictorService` role, built from the child's context.

`workers.entry` spawns it as `mer-predictor`; `mer.runtime.child.run_child` calls `start`, `serve`
and `close`. What it learns and hints lives in `mer.predict`.
"""

from __future__ import annotations

from mer.predict.service import PredictorService


class Predictor(PredictorService):
    def __init__(self, context):
        super().__init__(context.config, context.run, context.log, context.zmq)
