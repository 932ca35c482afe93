"""The predictor role: learns from every routing decision and hints the I/O worker what to read next.

Binds a PULL on `observe.sock` (the router's `RoutingObserved`), connects a DEALER to `io.sock`
and sends `PrefetchHints` after each observation when prefetch is on. A malformed observation is
logged and skipped.

The predictors switched on by `predictors` (`mer.predict`) all learn from every decision; their hints
are scored and fused by `mer.predict.fusion.FusedPredictors` (at most `predict_fanout x
pipeline_depth`) and sent as one `PrefetchHints` per source predictor, so the I/O worker counts each
hint for the predictor that contributed it most. Each predictor's cumulative accuracy goes to the
I/O worker as `PredictorStats` after every scored observation (merged into its per-predictor prefetch
counters, which reach the run summary). With `max_pinned > 0` the locality predictor's hot experts
are sent as a `PinSet` whenever they change.

Progress: the predictor connects a PUSH to the router's `predictor_progress.sock` and its event loop
sends `PredictorProgress` (pid, observations consumed) every `progress_interval_s(job_deadline_s)`
while it consumed observations since the last report or awaits the send of its hints (never blocking:
one the router does not take at once is dropped, the next says more). A predictor spinning in a busy
loop sends none, and the router names it stuck (`mer.router.predictor_link`). `MER_WORK_FAULTS=
spin:predictor:N` injects such a loop in the N-th observation of its first process, for the tests.

The next-layer gate predictor (`gate`, `mer.predict.gate`) reads the router gates of the generation
job's GGUF, named by the supervisor in the run spec (`RunSpec.model`), at start-up (so a bad model
fails the handshake); the router then sends a `HiddenObserved` (the token's residual at that MoE
layer) just before each `RoutingObserved`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import numpy as np
import zmq

from mer.environment import WorkFaults, read_environment
from mer.predict.fusion import GATE, FusedPredictors, make_predictors
from mer.router.work_deadlines import progress_interval_s
from mer.runtime.child import receive_unless_stopped
from mer.runtime.fault_loops import spin_forever
from mer.protocol import (HiddenObserved, PinSet, PredictorProgress, PrefetchHint, PrefetchHints, RoutingObserved,
                          check_expert_ids, decode, encode)
from mer.store.manifest import Manifest


class PredictorService:
    def __init__(self, config, run, log, zmq_context):
        self.config, self.run, self.log, self.zmq = config, run, log, zmq_context
        manifest = Manifest.load(run.store)
        self.names = config.predictors
        self.num_experts = manifest.geometry.num_experts
        self.gate = None
        if GATE in self.names:
            from mer.predict.gate import load_gate_predictor  # numpy + numba: only when the gate is on

            self.gate = load_gate_predictor(run.model, manifest, config.gate_min_ratio,
                                            replay=config.gate_model is not None)
        self.predictors = make_predictors(self.names, manifest.geometry.num_experts, config.top_k,
                                          max_pinned=config.max_pinned, gate=self.gate)
        self.pins: list[int] = []
        self.observe = None
        self.io = None
        self.progress = None
        self.fused = FusedPredictors(self.predictors)
        self.observations = 0  # observation messages consumed by this process
        self.reported = 0  # `observations` at the last PredictorProgress
        self.handling = False  # an observation is being handled (its hints may await their send)
        self.faults = read_environment().work_faults or WorkFaults()

    async def start(self) -> dict:
        run, zmq_context = self.run, self.zmq
        self.observe = zmq_context.socket(zmq.PULL)
        self.observe.setsockopt(zmq.LINGER, 0)
        self.observe.bind(run.endpoint("observe"))
        self.io = zmq_context.socket(zmq.DEALER)
        self.io.setsockopt(zmq.LINGER, 0)
        self.io.connect(run.endpoint("io"))
        self.progress = zmq_context.socket(zmq.PUSH)
        self.progress.setsockopt(zmq.LINGER, 0)
        self.progress.connect(run.endpoint("predictor_progress"))
        info = {"predictor": ",".join(self.names), "prefetch": self.config.prefetch}
        if self.gate is not None:
            started = time.perf_counter()
            self.gate.weights.ranking(0, np.zeros(self.gate.weights.d_model, np.float32))  # compile the gate's kernel
            info.update(gate_model=self.gate.weights.path, gate_warm_up_s=round(time.perf_counter() - started, 3))
        return info

    async def serve(self, stop: asyncio.Event) -> None:
        reporter = asyncio.create_task(self._report_progress())
        try:
            await self._serve(stop)
        finally:
            reporter.cancel()

    async def _serve(self, stop: asyncio.Event) -> None:
        while True:
            frames = await receive_unless_stopped(self.observe, stop)
            if frames is None:
                return
            self.observations += 1
            if self.faults.spin is not None and self.faults.spins_in("predictor", self.observations,
                                                                      self.run.incarnation):
                spin_forever(self.log, observation=self.observations)
            self.handling = True
            try:  # a PULL socket cannot answer: a malformed observation is logged and dropped
                message = decode(frames, expected_kinds=(RoutingObserved, HiddenObserved))
                if isinstance(message, HiddenObserved):
                    self._observe_hidden(message)
                else:
                    check_expert_ids("RoutingObserved", message.expert_ids, self.num_experts)
                    await self._observe(message)
            except Exception as error:
                self.log.warning("bad_observation", error=str(error))
            finally:
                self.handling = False

    async def _report_progress(self) -> None:
        """`PredictorProgress` every interval while observations were consumed or one is being handled; a
        report the router does not take at once is dropped (the predictor never waits for the router)."""
        interval = progress_interval_s(self.config.job_deadline_s)
        while True:
            await asyncio.sleep(interval)
            if self.observations != self.reported or self.handling:
                self.reported = self.observations
                with contextlib.suppress(zmq.Again):
                    await self.progress.send_multipart(encode(PredictorProgress(os.getpid(), self.observations)),
                                                       flags=zmq.NOBLOCK)

    def _observe_hidden(self, message: HiddenObserved) -> None:
        for predictor in self.predictors:
            if predictor.observe_hidden is not None:
                predictor.observe_hidden(message.token, message.layer, message.hidden)

    async def _observe(self, message: RoutingObserved) -> None:
        """Learn from one decision, report accuracies, then send pins and fused hints."""
        for report in self.fused.observe(message.token, message.layer, list(message.expert_ids)):
            await self.io.send_multipart(encode(report))
        await self._send_pins()
        if not self.config.prefetch:
            return
        by_source: dict[str, list[PrefetchHint]] = {}
        # one message per source, best first within and across
        for expert, score, source in self.fused.hints(self.config.predict_fanout, self.config.pipeline_depth):
            by_source.setdefault(source, []).append(PrefetchHint(expert, score))
        for source, hint_list in by_source.items():
            await self.io.send_multipart(encode(PrefetchHints(message.token, hint_list, source)))

    async def _send_pins(self) -> None:
        """With the locality predictor and max_pinned > 0: send its pin set whenever it changes."""
        if self.config.max_pinned == 0:
            return
        for predictor in self.predictors:
            if predictor.name == "locality":
                pins = predictor.model.pinned()
                if pins != self.pins:
                    self.pins = pins
                    await self.io.send_multipart(encode(PinSet(predictor.name, pins)))

    async def on_control(self, message) -> None:
        pass

    def close(self) -> None:
        for socket in (self.observe, self.io, self.progress):
            if socket is not None:
                socket.close(linger=0)
