"""The predictor: learns from every routing decision and hints the I/O worker what to read next.

Binds a PULL on `observe.sock` (the router's `RoutingObserved`), connects a DEALER to `io.sock`
and sends `PrefetchHints` after each observation when prefetch is on. A malformed observation is
logged and skipped.

The predictors switched on by `predictors` (`markov`, `locality`, `affinity`: `mer.predict`) all
learn from every decision; their hints are fused (`mer.predict.fusion.fuse`, weighted by each
predictor's smoothed top-k accuracy so far, at most
`predict_fanout x pipeline_depth`) and sent as one `PrefetchHints` per source predictor, so the
I/O worker counts each hint for the predictor that contributed it most. With `max_pinned > 0` the
locality predictor's hot experts are sent as a `PinSet` whenever they change.

Each predictor scores its own previous hints against the next decision it observes
(`mer.predict.accuracy`) and reports its cumulative top-1 / top-k counters to the I/O worker as
`PredictorStats` after every scored observation (the I/O worker merges them into its per-predictor
prefetch counters, which reach the run summary).
"""

from __future__ import annotations

import asyncio

import zmq

from mer.errors import ProtocolError
from mer.predict.accuracy import AccuracyTracker
from mer.predict.fusion import fuse, make_predictors, parse_predictor_names
from mer.runtime.child import receive_unless_stopped
from mer.protocol import PinSet, PredictorStats, PrefetchHint, PrefetchHints, RoutingObserved, decode, encode
from mer.store.manifest import Manifest


class Predictor:
    def __init__(self, context):
        self.context = context
        config = context.config
        geometry = Manifest.load(context.run.store).geometry
        self.names = parse_predictor_names(config.predictors)
        self.predictors = make_predictors(self.names, geometry.num_experts, config.top_k, max_pinned=config.max_pinned)
        self.pins: list[int] = []
        self.observe = None
        self.io = None
        self.hints_sent = 0
        self.accuracy = AccuracyTracker()

    async def start(self) -> dict:
        run, zmq_context = self.context.run, self.context.zmq
        self.observe = zmq_context.socket(zmq.PULL)
        self.observe.setsockopt(zmq.LINGER, 0)
        self.observe.bind(run.endpoint("observe"))
        self.io = zmq_context.socket(zmq.DEALER)
        self.io.setsockopt(zmq.LINGER, 0)
        self.io.connect(run.endpoint("io"))
        return {"predictor": ",".join(self.names), "prefetch": self.context.config.prefetch}

    async def serve(self, stop: asyncio.Event) -> None:
        while True:
            frames = await receive_unless_stopped(self.observe, stop)
            if frames is None:
                return
            try:
                message = decode(frames, expected_kinds=(RoutingObserved,))
            except ProtocolError as error:
                self.context.log.warning("bad_observation", error=str(error))
                continue
            await self._observe(message)

    async def _observe(self, message: RoutingObserved) -> None:
        """Learn from one decision, report accuracies, then send pins and fused hints."""
        config = self.context.config
        expert_ids = list(message.expert_ids)
        for predictor in self.predictors:
            predictor.observe(message.layer, expert_ids)
        for name in self.accuracy.observe(expert_ids):
            await self.io.send_multipart(encode(PredictorStats(name, self.accuracy.as_dict(name))))
        await self._send_pins()
        if not config.prefetch:
            return
        ranked = {}
        for predictor in self.predictors:
            hints = predictor.predict(config.predict_fanout, config.pipeline_depth)
            ranked[predictor.name] = hints
            if hints:
                self.accuracy.hinted(predictor.name, [expert for expert, _ in hints])
        weights = {name: self.accuracy.weight(name) for name in ranked}
        fused = fuse(ranked, config.predict_fanout * config.pipeline_depth, weights)
        by_source: dict[str, list[PrefetchHint]] = {}
        for expert, score, source in fused:  # one message per source, best first within and across
            by_source.setdefault(source, []).append(PrefetchHint(expert, score))
        for source, hint_list in by_source.items():
            self.hints_sent += len(hint_list)
            await self.io.send_multipart(encode(PrefetchHints(message.token, hint_list, source)))

    async def _send_pins(self) -> None:
        """With the locality predictor and max_pinned > 0: send its pin set whenever it changes."""
        if self.context.config.max_pinned == 0:
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
        for socket in (self.observe, self.io):
            if socket is not None:
                socket.close(linger=0)
