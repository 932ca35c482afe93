"""Run the server: the process graph with the serving job, and uvicorn on the same uvloop event loop.

The listening socket is bound first (a port in use is a one-line error before any process starts),
then the HTTP server and the supervisor start side by side: `/health` answers 503 `loading` until the
router has loaded the model (its first `ServeStep`), then 200. SIGINT or SIGTERM (or the graph
failing) ends it: every open stream gets an error event at once and new requests get 503, uvicorn
closes (open responses get `SHUTDOWN_GRACE_S`), then the graph is shut down as every run is (no
process, `/dev/shm` segment or runtime directory left behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass

import uvicorn

from mer.cli.generation_setup import SINGLE_THREAD_BLAS, PreparedServing
from mer.errors import ConfigError, Terminated
from mer.logging_setup import get_logger, with_log_writes_in_background
from mer.runtime.supervisor import Supervisor
from mer.serve.app import build_app
from mer.serve.hub import ServingHub
from mer.serve.metrics import ServeMetrics
from mer.serve.openai_requests import ServedModel

SHUTDOWN_GRACE_S = 2.0


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP side of `mer-pipeline serve` (its flags)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_sequences: int = 8
    max_queue: int = 64
    api_key: str | None = None


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the server's (`serve`) decide how the graph goes down."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening TCP socket, bound now; a ConfigError naming the address if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {error.strerror or error}") from None
    return listener


def model_id(prepared: PreparedServing) -> str:
    """The model's name in `/v1/models`: the GGUF's file name without `.gguf`."""
    name = prepared.start.model.rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


async def serve(prepared: PreparedServing, settings: ServerSettings, listener: socket.socket) -> None:
    """Serve until SIGINT/SIGTERM (then KeyboardInterrupt / Terminated) or the graph fails (its error)."""
    for name, value in SINGLE_THREAD_BLAS.items():
        os.environ.setdefault(name, value)
    supervisor: Supervisor | None = None

    async def to_router(message) -> None:
        assert supervisor is not None
        await supervisor.send_to_router(message)

    start = prepared.start
    hub = ServingHub(settings.max_sequences, settings.max_queue, to_router)
    metrics = ServeMetrics(lambda: hub.last_step, lambda: hub.num_in_flight, kv_positions=start.kv_positions,
                           cache_slots=prepared.config.cache_slots, max_sequences=start.max_sequences)
    hub.on_step = metrics.on_step
    served = ServedModel(model_id(prepared), prepared.tokenizer, prepared.context_length, start.kv_positions)
    supervisor = Supervisor(prepared.config, prepared.store, job=start, on_serving=hub.on_message)
    http = _Uvicorn(uvicorn.Config(build_app(hub, served, metrics, settings.api_key), lifespan="off", log_level="warning",
                                   access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    host, port = listener.getsockname()[:2]
    print(f"mer-pipeline serve: {served.model_id} on http://{host}:{port}/v1 (loading; /health says when ready)",
          file=sys.stderr, flush=True)
    get_logger().info("server_listening", host=host, port=port, model=served.model_id,
                      max_sequences=settings.max_sequences, max_queue=settings.max_queue,
                      kv_positions=start.kv_positions, api_key=settings.api_key is not None)
    await with_log_writes_in_background(_run_until_stopped(supervisor, http, hub, listener))


async def _run_until_stopped(supervisor: Supervisor, http: _Uvicorn, hub: ServingHub, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    received: list[int] = []
    stopping = asyncio.Event()

    def interrupt(signal_number: int) -> None:
        received.append(signal_number)
        stopping.set()

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, interrupt, signal_number)
    graph = asyncio.create_task(supervisor.run())
    web = asyncio.create_task(http.serve(sockets=[listener]))
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({graph, web, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        reason = signal.Signals(received[0]).name if received else "the graph stopped"
        hub.fail_all(f"server shutting down ({reason})")
        http.should_exit = True
        stop.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(SHUTDOWN_GRACE_S * 2):  # not wait_for: see Supervisor._next_event
                await web
        if not graph.done():
            graph.cancel()
        await asyncio.gather(graph, return_exceptions=True)
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signal_number)
        get_logger().info("server_stopped", reason=reason)
    if not graph.cancelled() and graph.exception() is not None:
        raise graph.exception()
    if received:
        message = f"{signal.Signals(received[0]).name}: server and graph shut down"
        raise Terminated(message) if received[0] == signal.SIGTERM else KeyboardInterrupt(message)
