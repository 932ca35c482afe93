"""One completion as it is generated: the router's reports turned into text pieces, measured.

`generate_pieces` reads a request's stream (`mer.serve.hub.RequestStream`) and yields `Piece`s: the
text each token adds (stop strings applied: `mer.serve.text_stream`), the token's logprobs when
asked for, and at the end the OpenAI `finish_reason` (`stop`: an end-of-generation token or a stop
string; `length`: `max_tokens` or the context). It records time to first token, inter-token latency
and token counts in the metrics. A stop string cancels the sequence in the router at once; a stream
that ends without its `SequenceDone` (the server going down) raises `ApiError` 503.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mer.model.generate import STOP_END_OF_GENERATION
from mer.protocol import SequenceDone, SequenceToken
from mer.serve.hub import RequestStream, ServingHub, StreamFailed
from mer.serve.metrics import ServeMetrics
from mer.serve.openai_requests import ApiError
from mer.serve.text_stream import CompletionText


@dataclass(frozen=True)
class Piece:
    """What one step adds to a completion: text, the token (None for the closing piece), the finish reason."""

    text: str
    token: SequenceToken | None = None
    finish_reason: str | None = None


@dataclass
class CompletionTally:
    """Token counts of one completion (its usage)."""

    prompt_tokens: int
    completion_tokens: int = 0


async def generate_pieces(hub: ServingHub, stream: RequestStream, text: CompletionText, metrics: ServeMetrics,
                          tally: CompletionTally) -> AsyncIterator[Piece]:
    """The completion's pieces (see the module docstring)."""
    last_token_at = None
    while True:
        report = await stream.next()
        if isinstance(report, StreamFailed):
            raise ApiError(503, f"the stream ended: {report.reason}", error_type="server_error", code="shutting_down")
        if isinstance(report, SequenceDone):
            if report.stop_reason == "error":
                raise ApiError(500, f"the router could not serve the request: {report.error}", error_type="server_error")
            finish = "stop" if report.stop_reason == STOP_END_OF_GENERATION else "length"
            yield Piece(text.finish(), None, finish)
            _request_done(metrics, stream)
            return
        assert isinstance(report, SequenceToken)
        now = time.perf_counter()
        if last_token_at is None:
            metrics.time_to_first_token.observe(now - stream.started)
        else:
            metrics.inter_token_latency.observe(now - last_token_at)
        last_token_at = now
        tally.completion_tokens += 1
        metrics.generated_tokens.inc()
        delta = text.add(report.token)
        if text.stopped:
            hub.cancel_soon(stream, "stop string")
            yield Piece(delta, report, "stop")
            _request_done(metrics, stream)
            return
        yield Piece(delta, report)


def _request_done(metrics: ServeMetrics, stream: RequestStream) -> None:
    metrics.request_duration.observe(time.perf_counter() - stream.started)
