"""`mer-pipeline up`: bring the process graph up and run a job through it.

With `--store` it runs the benchmark job with `run`'s flags; with `--model` it converts the GGUF's
experts once (cached by the GGUF's identity) and runs a short generation demo (`--tokens` tokens,
greedy, after a fixed prompt; text streamed as `mer-pipeline generate` does); with no arguments it
runs that demonstration on the embedded default, the trained tiny model shipped in `mer/models`
(docs/tiny-model.md), after the prompt "def ". With `--serve` it serves `--model` (default: the
embedded model) over HTTP instead, as `mer-pipeline serve` does (docs/serving.md). With only `--config` it runs the benchmark on a
small synthetic store created once under the cache directory. After a benchmark job in a terminal
the graph stays up, showing live figures, until Ctrl-C; without a terminal on stdin, and after a
generation demo, `up` exits after the job (0 on success).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mer.cli import serve_command
from mer.cli.pipeline_flags import add_config_flag, add_config_flags
from mer.cli.serve_command import add_server_flags
from mer.errors import ConfigError
from mer.cli.pipeline_job import run_pipeline_job
from mer.config import config_overrides, load_config
from mer.logging_setup import configure_logging
from mer.models import tiny_model_path
from mer.store.demo import demo_store

DEMO_PROMPT = "Once upon a time"
EMBEDDED_DEMO_PROMPT = "def "  # the embedded model was trained on Python source
DEMO_GENERATED_TOKENS = 32


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start the process graph and run a job (a demo when given nothing)",
        description=(
            "Start the process graph and run a job through it: the benchmark on --store, a short text generation "
            "from --model (its experts converted once and cached), or with no arguments a short demo on an "
            "embedded default store. In a terminal the benchmark's graph stays up until Ctrl-C; otherwise up "
            "exits after the job."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    add_config_flag(source, "store")
    source.add_argument("--model", type=Path, metavar="GGUF", default=None,
                        help="A MoE GGUF: generate --tokens tokens (default 32) after a fixed prompt; its experts "
                             "are converted once into the cache directory.")
    add_config_flags(parser, skip=("store",))
    parser.add_argument("--json", action="store_true",
                        help="Print the run summary (or the generation's result) as one JSON object on stdout.")
    parser.add_argument("--serve", action="store_true",
                        help="Serve --model (default: the embedded model) over an OpenAI-compatible HTTP API until "
                             "SIGINT/SIGTERM, as `mer-pipeline serve` does (its flags below).")
    add_server_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.serve:
        if args.store is not None:
            raise ConfigError("--serve serves a model: give --model MODEL.gguf (or nothing: the embedded model), "
                              "not --store")
        return serve_command.run(args)
    if args.model is None and args.store is None and args.config is None:
        args.model = tiny_model_path()  # the embedded default: the trained tiny model (docs/tiny-model.md)
        return generation_demo(args, prompt=EMBEDDED_DEMO_PROMPT)
    if args.model is not None:
        return generation_demo(args)
    config = load_config(args.config, config_overrides(args))  # --store or --config is given here
    if config.store is None:
        config = load_config(args.config, {**config_overrides(args), "store": str(demo_store())})
        print(f"mer-pipeline up: demo job on {config.store} ({config.tokens} tokens, "
              f"{config.compute_workers} compute workers)", file=sys.stderr)
    return run_pipeline_job(config, as_json=args.json, stay_up=sys.stdin.isatty() and sys.stderr.isatty())


def generation_demo(args: argparse.Namespace, prompt: str = DEMO_PROMPT) -> int:
    """`up --model`: a short greedy generation through the graph, printed as `generate` prints it."""
    from mer.cli.generate_command import generate_and_print
    from mer.cli.progress import ProgressDisplay
    from mer.cli.generation_setup import PromptSpec, prepare_generation

    configure_logging("mer-supervisor", log_file=args.log_file)
    max_tokens = args.tokens or DEMO_GENERATED_TOKENS
    with ProgressDisplay("up") as display:
        prepared = prepare_generation(args.model, PromptSpec(prompt), max_tokens=max_tokens,
                                      config_path=args.config, overrides=config_overrides(args),
                                      start_phase=display.start_phase)
    print(f"mer-pipeline up: generating {max_tokens} tokens from {args.model} after {prompt!r}",
          file=sys.stderr)
    return generate_and_print(prepared, as_json=args.json, command="up")
