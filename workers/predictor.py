"""The predictor: learns from every routing decision and hints the I/O worker what to read next.

Binds a PULL on `observe.sock` (the router's `RoutingObserved`), connects a DEALER to `io.sock`
and sends `PrefetchHints` after each observation when prefetch is on. A malformed observation is
logged and skipped.
"""

from __future__ import annotations

import asyncio

import zmq

from mer.errors import ProtocolError
from mer.predict.markov import MarkovPredictor
from mer.runtime.child import receive_unless_stopped
from mer.protocol import PrefetchHint, PrefetchHints, RoutingObserved, decode, encode
from mer.store.manifest import Manifest


class Predictor:
    def __init__(self, context):
        self.context = context
        config = context.config
        geometry = Manifest.load(context.run.store).geometry
        self.model = MarkovPredictor(geometry.num_experts, config.top_k)
        self.observe = None
        self.io = None
        self.hints_sent = 0

    async def start(self) -> dict:
        run, zmq_context = self.context.run, self.context.zmq
        self.observe = zmq_context.socket(zmq.PULL)
        self.observe.setsockopt(zmq.LINGER, 0)
        self.observe.bind(run.endpoint("observe"))
        self.io = zmq_context.socket(zmq.DEALER)
        self.io.setsockopt(zmq.LINGER, 0)
        self.io.connect(run.endpoint("io"))
        return {"predictor": "markov", "prefetch": self.context.config.prefetch}

    async def serve(self, stop: asyncio.Event) -> None:
        config = self.context.config
        while True:
            frames = await receive_unless_stopped(self.observe, stop)
            if frames is None:
                return
            try:
                message = decode(frames, expected_kinds=(RoutingObserved,))
            except ProtocolError as error:
                self.context.log.warning("bad_observation", error=str(error))
                continue
            self.model.observe(list(message.expert_ids))
            if not config.prefetch:
                continue
            hints = self.model.predict(config.predict_fanout, config.pipeline_depth)
            if hints:
                self.hints_sent += len(hints)
                hint_list = [PrefetchHint(expert, score) for expert, score in hints]
                await self.io.send_multipart(encode(PrefetchHints(message.token, hint_list, "markov")))

    async def on_control(self, message) -> None:
        pass

    def close(self) -> None:
        for socket in (self.observe, self.io):
            if socket is not None:
                socket.close(linger=0)
