"""The HTTP routes (Starlette): OpenAI's `/v1/completions`, `/v1/chat/completions`, `/v1/models`, and
`/health`, `/metrics`.

With an API key every `/v1/` route needs `Authorization: Bearer KEY` (401 otherwise); `/health` and
`/metrics` stay open, for probes and scrapers on the same host. Errors are OpenAI's error objects.
A streamed response is server-sent events ending in `data: [DONE]`; a stream cut by the server going
down ends with an `{"error": ...}` event instead. A client that goes away (a closed stream, or a
closed connection while a whole response is computed) has its sequence cancelled in the router,
which frees it at its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mer.serve.completions import CompletionTally, Piece, generate_pieces
from mer.serve.hub import RequestStream, ServingHub
from mer.serve.metrics import CONTENT_TYPE, ServeMetrics
from mer.serve.openai_requests import ApiError, GenerationRequest, ServedModel, parse_chat, parse_completion
from mer.serve.openai_responses import ResponseShape, sse
from mer.serve.text_stream import CompletionText


def build_app(hub: ServingHub, served: ServedModel, metrics: ServeMetrics, api_key: str | None) -> Starlette:
    """The server's ASGI app."""

    async def health(request: Request) -> Response:
        if hub.is_ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "shutting_down" if hub.closing else "loading"}, status_code=503)

    async def models(request: Request) -> Response:
        check_key(request, api_key)
        return JSONResponse({"object": "list", "data": [{"id": served.model_id, "object": "model", "created": 0,
                                                         "owned_by": "mer"}]})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def generation_route(endpoint: str, parse: Callable, chat: bool):
        async def route(request: Request) -> Response:
            check_key(request, api_key)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON") from None
            generation = parse(body, served)
            stream = await hub.open(generation)
            metrics.prompt_tokens.inc(len(generation.prompt_tokens))
            shape = ResponseShape(chat, served.model_id, served.tokenizer, generation.logprobs, generation.want_logprobs)
            tally = CompletionTally(len(generation.prompt_tokens))
            pieces = generate_pieces(hub, stream, CompletionText(served.tokenizer, generation.stop), metrics, tally)
            if generation.stream:
                metrics.requests.labels(endpoint, "200").inc()
                return StreamingResponse(stream_events(hub, stream, generation, shape, pieces, tally),
                                         media_type="text/event-stream")
            return JSONResponse(await whole_response(hub, stream, request, shape, pieces, tally))

        return counted(endpoint, metrics, route)

    routes = [Route("/health", health), Route("/metrics", prometheus),
              Route("/v1/models", counted("/v1/models", metrics, models)),
              Route("/v1/completions", generation_route("/v1/completions", parse_completion, False), methods=["POST"]),
              Route("/v1/chat/completions", generation_route("/v1/chat/completions", parse_chat, True),
                    methods=["POST"])]
    return Starlette(routes=routes)


def check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid API key: send Authorization: Bearer <the server's --api-key>",
                       code="invalid_api_key")


def counted(endpoint: str, metrics: ServeMetrics, route):
    """`route` with its errors answered as OpenAI error objects and every answer counted by status."""

    async def answer(request: Request) -> Response:
        try:
            response = await route(request)
        except ApiError as error:
            metrics.requests.labels(endpoint, str(error.status)).inc()
            return JSONResponse(error.body(), status_code=error.status)
        if not isinstance(response, StreamingResponse):  # a stream was counted when it started
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    return answer


async def whole_response(hub: ServingHub, stream: RequestStream, request: Request, shape: ResponseShape,
                         pieces: AsyncIterator[Piece], tally: CompletionTally) -> dict:
    """Collect every piece, unless the client goes away first (then its sequence is cancelled)."""

    async def collect() -> list[Piece]:
        return [piece async for piece in pieces]

    collecting = asyncio.ensure_future(collect())
    watching = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            hub.cancel_soon(stream, "client disconnected")
    if collecting.cancelled():
        raise ApiError(499, "the client closed the connection before the completion was done")
    return shape.whole(collecting.result(), tally)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream_events(hub: ServingHub, stream: RequestStream, generation: GenerationRequest, shape: ResponseShape,
                        pieces: AsyncIterator[Piece], tally: CompletionTally) -> AsyncIterator[str]:
    """The server-sent events of a streamed response (see the module docstring)."""
    try:
        if shape.chat:
            yield sse(shape.chunk(None, first=True))
        try:
            async for piece in pieces:
                if piece.text or piece.finish_reason or piece.token is not None and shape.want_logprobs:
                    yield sse(shape.chunk(piece))
        except ApiError as error:
            yield sse(error.body())
            return
        if generation.include_usage:
            yield sse(shape.usage_chunk(tally))
        yield sse("[DONE]")
    finally:
        hub.cancel_soon(stream, "client disconnected")  # nothing when the sequence is done
