"""The bridge between HTTP requests and the serving job in the router.

`ServingHub` gives each request an id, sends `SubmitSequence` to the router and hands the router's
`SequenceToken` / `SequenceDone` for it to the request's own queue (`RequestStream`), and keeps the
last `ServeStep` (the job's figures). Admission control happens here, at once: a request is refused
with 503 while the graph is starting or shutting down, and when `max_sequences + max_queue` requests
are already in the router (running or waiting there: the router runs at most `max_sequences`, the
others wait in its queue in arrival order). `fail_all` ends every open stream with an error (the
server is going down).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mer.protocol import CancelSequence, SequenceDone, SequenceToken, ServeStep, SubmitSequence
from mer.serve.openai_requests import ApiError, GenerationRequest


@dataclass(frozen=True)
class StreamFailed:
    """The end of a stream without a `SequenceDone`: the server is shutting down or the graph failed."""

    reason: str


@dataclass
class RequestStream:
    """One request's reports from the router, in order: `SequenceToken`s then `SequenceDone` (or `StreamFailed`)."""

    request_id: int
    request: GenerationRequest
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False  # SequenceDone (or a failure) arrived: the router no longer holds it
    cancel_sent: bool = False

    async def next(self) -> SequenceToken | SequenceDone | StreamFailed:
        return await self.queue.get()


class ServingHub:
    """Requests in flight and the serving job's state (see the module docstring)."""

    def __init__(self, max_sequences: int, max_queue: int, send: Callable[[object], Awaitable[None]],
                 on_step: Callable[[ServeStep], None] | None = None):
        self.max_in_flight = max_sequences + max_queue
        self.send = send  # a control message to the router
        self.on_step = on_step
        self.streams: dict[int, RequestStream] = {}
        self.ids = itertools.count(1)
        self.last_step: ServeStep | None = None  # None until the job has loaded the model
        self.closing: str | None = None
        self.sending: set[asyncio.Task] = set()  # cancellations on their way to the router

    @property
    def is_ready(self) -> bool:
        return self.last_step is not None and self.closing is None

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    def on_message(self, message: SequenceToken | SequenceDone | ServeStep) -> None:
        """A report of the serving job (the supervisor's `on_serving`)."""
        if isinstance(message, ServeStep):
            self.last_step = message
            if self.on_step is not None:
                self.on_step(message)
            return
        stream = self.streams.get(message.request_id)
        if stream is None:
            return  # a token of a request already failed (shutting down): nobody waits for it
        if isinstance(message, SequenceDone):
            stream.done = True
            del self.streams[message.request_id]
        stream.queue.put_nowait(message)

    async def open(self, request: GenerationRequest) -> RequestStream:
        """Admit a request and send it to the router; 503 at once when it cannot be taken."""
        if self.closing is not None:
            raise ApiError(503, f"the server is shutting down ({self.closing})", error_type="server_error",
                           code="shutting_down")
        if self.last_step is None:
            raise ApiError(503, "the model is loading: try again when /health says ready", error_type="server_error",
                           code="loading")
        if self.num_in_flight >= self.max_in_flight:
            raise ApiError(503, f"the server is full: {self.num_in_flight} requests in flight (--max-sequences plus "
                                f"--max-queue); try again later", error_type="server_error", code="overloaded")
        stream = RequestStream(next(self.ids), request)
        self.streams[stream.request_id] = stream
        alternatives = max(request.logprobs, 1) if request.want_logprobs else 0
        await self.send(SubmitSequence(stream.request_id, request.prompt_tokens, request.max_tokens,
                                       request.temperature, request.top_k, request.top_p, request.seed,
                                       request.ignore_eos, alternatives))
        return stream

    def cancel_soon(self, stream: RequestStream, reason: str) -> None:
        """Ask the router to free a sequence still in it (client gone, stop string matched). Sent from a task
        of its own: a handler being cancelled (its client disconnected) cannot await anything any more."""
        if stream.done or stream.cancel_sent or self.closing is not None:
            return
        stream.cancel_sent = True
        task = asyncio.get_running_loop().create_task(self.send(CancelSequence(stream.request_id, reason)))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    def fail_all(self, reason: str) -> None:
        """End every open stream with `StreamFailed(reason)`; refuse new requests from now on."""
        self.closing = reason
        for stream in self.streams.values():
            stream.done = True
            stream.queue.put_nowait(StreamFailed(reason))
        self.streams.clear()
