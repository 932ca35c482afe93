"""`mer-pipeline up`: bring the process graph up and run a job through it.

With `--store` it runs the benchmark job with `run`'s flags; with `--model` it converts the GGUF's
experts once (cached by the GGUF's identity) and runs a short generation demo (`--tokens` tokens,
greedy, after a fixed prompt): the prompt and its completion stream to stdout as one block ending
with one newline, then one summary line goes to stderr (`mer.cli.demo_output`). With no arguments it
runs that demonstration on the embedded default, the trained tiny model shipped in `mer/models`
(docs/tiny-model.md), after the prompt "def ", with an expert cache of half the model's experts
(`demo_cache_slots`) so that the experts stream. Unless a flag or the config file gives the count,
the demos start only the compute workers the model gives work to (`mer.cli.worker_choice`). With `--serve` it serves `--model` (default: the
embedded model) over HTTP instead, as `mer-pipeline serve` does (docs/serving.md). With only `--config` it runs the benchmark on a
small synthetic store created once under the cache directory. After a benchmark job in a terminal
the graph stays up, showing live figures, until Ctrl-C; without a terminal on stdin, and after a
generation demo, `up` exits after the job (0 on success).
"""

from __future__ import annotations

import argparse
import sys

import uvloop
from pathlib import Path
from typing import TYPE_CHECKING

from mer.cli import serve_command
from mer.cli.pipeline_flags import add_config_flag, add_config_flags
from mer.cli.serve_command import add_server_flags
from mer.errors import ConfigError
from mer.cli.pipeline_job import run_pipeline_job
from mer.config import config_overrides, load_config
from mer.logging_setup import configure_logging
from mer.model.hparams import read_hparams
from mer.models import tiny_model_path
from mer.store.gguf_source import read_gguf_source
from mer.store.demo import demo_store

if TYPE_CHECKING:
    from mer.cli.generation_setup import PreparedGeneration

DEMO_PROMPT = "Once upon a time"
EMBEDDED_DEMO_PROMPT = "def "  # the embedded model was trained on Python source
DEMO_GENERATED_TOKENS = 32


def demo_cache_slots(num_experts: int, top_k: int) -> int:
    """The embedded demo's expert cache: half the model's experts (at least the `top_k` one layer routes
    to), so that the demo reads experts from the store as a model larger than RAM does. The prefetch
    reserve comes on top (`mer.runtime.ram_budget.pool_slots`)."""
    if num_experts < 1 or top_k < 1:
        raise ValueError(f"a model has at least one expert and routes to at least one: {num_experts}, {top_k}")
    return max(num_experts // 2, top_k)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start the process graph and run a job (a demo when given nothing)",
        description=(
            "Start the process graph and run a job through it: the benchmark on --store, a short text generation "
            "from --model (its experts converted once and cached), or with no arguments a short demo with the "
            "embedded model (its cache holding half its experts): the prompt and its completion on stdout, one "
            "line of figures on stderr. In a terminal the benchmark's graph stays up until Ctrl-C; otherwise up "
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
        return generation_demo(args, prompt=EMBEDDED_DEMO_PROMPT, stream_experts=True)
    if args.model is not None:
        return generation_demo(args)
    config = load_config(args.config, config_overrides(args))  # --store or --config is given here
    if config.store is None:
        config = load_config(args.config, {**config_overrides(args), "store": str(demo_store())})
        print(f"mer-pipeline up: demo job on {config.store} ({config.tokens} tokens, "
              f"{config.compute_workers} compute workers)", file=sys.stderr)
    return run_pipeline_job(config, as_json=args.json, stay_up=sys.stdin.isatty() and sys.stderr.isatty())


def generation_demo(args: argparse.Namespace, prompt: str = DEMO_PROMPT, stream_experts: bool = False) -> int:
    """`up --model` (and `up`): a short greedy generation through the graph, printed as a block and one
    summary line (`--json`: the object `generate --json` prints). `stream_experts` sizes the cache with
    `demo_cache_slots` unless --cache-slots or the config file does."""
    from mer.cli.generate_command import generate_and_print
    from mer.cli.progress import ProgressDisplay
    from mer.cli.generation_setup import PromptSpec, prepare_generation

    configure_logging("mer-supervisor", log_file=args.log_file)
    max_tokens = args.tokens or DEMO_GENERATED_TOKENS
    overrides = config_overrides(args)
    if stream_experts and overrides.get("cache_slots") is None and args.config is None:
        source = read_gguf_source(args.model)
        overrides["cache_slots"] = demo_cache_slots(source.geometry.num_experts, read_hparams(source.parts[0]).top_k)
    with ProgressDisplay("up") as display:
        prepared = prepare_generation(args.model, PromptSpec(prompt), max_tokens=max_tokens, config_path=args.config,
                                      overrides=overrides, start_phase=display.start_phase, command="up",
                                      fit_workers=True)
    workers = (prepared.worker_choice.describe() if prepared.worker_choice is not None
               else plural(prepared.config.num_compute_workers, "compute worker"))
    print(f"mer-pipeline up: generating {max_tokens} tokens from {args.model} after {prompt!r} with {workers}",
          file=sys.stderr)
    if args.json:
        return generate_and_print(prepared, as_json=True, command="up")
    return print_demo(prepared, prompt)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def print_demo(prepared: PreparedGeneration, prompt: str) -> int:
    """Run the prepared generation: the prompt and completion as one block on stdout, one summary line on stderr."""
    from mer.cli.demo_output import BlockStream, summary_line
    from mer.cli.generation_setup import run_generation
    from mer.cli.pipeline_job import _with_signals

    if prepared.ram_plan is not None:
        print(f"mer-pipeline up: {prepared.ram_plan.describe()}", file=sys.stderr)
    stream = BlockStream(prepared.tokenizer, prompt)
    summary = uvloop.run(run_generation(prepared, stream.add, supervise=_with_signals)).to_json_dict()
    stream.finish()
    print(summary_line(summary, cache_slots=prepared.config.cache_slots,
                       num_experts=prepared.store.manifest.geometry.num_experts), file=sys.stderr)
    return 0
