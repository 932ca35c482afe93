"""`mer-pipeline serve` (and `mer-pipeline up --serve`): an OpenAI-compatible HTTP server on the graph.

The model (default: the embedded tiny model) is checked and its experts converted before any process
starts; then the graph runs the serving job (continuous batching, `mer.router.serve_job`) and the HTTP
server (`mer.serve`) answers on --host/--port until SIGINT or SIGTERM (docs/serving.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import uvloop

from mer.cli.flag_types import positive_int
from mer.cli.cluster_flags import add_cluster_flags, cluster_options
from mer.cli.cluster_launch import run_with_cluster
from mer.cli.pipeline_flags import add_config_flags, add_model_flags
from mer.cli.progress import ProgressDisplay
from mer.config import GENERATION, config_overrides
from mer.logging_setup import configure_logging
from mer.models import tiny_model_path

DEFAULT_MAX_SEQUENCES = 8
DEFAULT_MAX_QUEUE = 64


def port_number(text: str) -> int:
    value = positive_int(text) if text != "0" else 0
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0..65535; 0: any free port)")
    return value


def queue_length(text: str) -> int:
    if text == "0":
        return 0
    return positive_int(text)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's flags, shared by `serve` and `up --serve`."""
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                        help="Address to listen on (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=port_number, default=8080, metavar="PORT",
                        help="TCP port (default 8080; 0: any free port, printed at start).")
    parser.add_argument("--max-sequences", type=positive_int, default=DEFAULT_MAX_SEQUENCES, metavar="N",
                        help=f"Sequences decoded together at most (default {DEFAULT_MAX_SEQUENCES}); more wait.")
    parser.add_argument("--max-queue", type=queue_length, default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"Requests that may wait beyond --max-sequences (default {DEFAULT_MAX_QUEUE}); "
                             f"more get 503 at once.")
    parser.add_argument("--kv-positions", type=positive_int, default=None, metavar="N",
                        help="KV cache positions shared by the sequences (default: a context per sequence, at most "
                             "a quarter of the RAM budget); a request takes prompt + max_tokens of them.")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="Require 'Authorization: Bearer KEY' on /v1/ routes (401 otherwise).")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a MoE GGUF over an OpenAI-compatible HTTP API",
        description="Start the process graph and an OpenAI-compatible HTTP server (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics) with continuous batching, until "
                    "SIGINT or SIGTERM. Without --model it serves the tiny model shipped with mer.")
    add_model_flags(parser, ram_budget_help="Bound the graph's resident memory (e.g. 8GiB): the KV pool takes at "
                                            "most a quarter, the slot arena what the dense weights, KV pool and "
                                            "processes leave.")
    add_server_flags(parser)
    add_config_flags(parser, job=GENERATION, skip=("cache_slots", "record_trace", "record_hidden"))
    add_cluster_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mer.cli.generation_setup import prepare_serving
    from mer.serve.server import ServerSettings, bind_listener, serve

    configure_logging("mer-supervisor", log_file=args.log_file)
    cluster = cluster_options(args)  # checked before anything starts
    model = args.model if args.model is not None else tiny_model_path()
    settings = ServerSettings(args.host, args.port, args.max_sequences, args.max_queue, args.api_key)
    listener = bind_listener(settings.host, settings.port)  # a port in use fails before anything starts
    try:
        with ProgressDisplay("serve") as display:
            prepared = prepare_serving(model, max_sequences=settings.max_sequences, config_path=args.config,
                                       overrides=config_overrides(args), ram_budget=getattr(args, "ram_budget", None),
                                       kv_positions=args.kv_positions, start_phase=display.start_phase)
        if prepared.ram_plan is not None:
            print(f"mer-pipeline serve: {prepared.ram_plan.describe()}", file=sys.stderr)

        def serve_on(remote_shards) -> int:
            start = dataclasses.replace(prepared.start, remote_shards=remote_shards)
            uvloop.run(serve(dataclasses.replace(prepared, start=start), settings, listener))
            return 0

        run_with_cluster(cluster, prepared.config.store, prepared.config, serve_on, "serve")
    finally:
        listener.close()
    return 0
