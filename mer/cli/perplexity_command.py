"""`mer-pipeline perplexity`: the perplexity of a text through the process graph, as llama-perplexity computes it.

Without `--model` it scores the tiny model shipped inside the package on the held-out text shipped
with it (`mer.models`); `--file` gives another text. The rules (chunks of `--ctx` tokens, the second
half of each scored, BOS at each chunk's start): `mer.model.perplexity`. Each chunk's score goes to
stderr as it comes; stdout gets llama-perplexity's lines (`[1]5.1234,[2]...` and `Final estimate: PPL
= ... +/- ...`), or with `--json` one JSON object (nothing else on stdout; nothing at all on error).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import uvloop

from mer.cli.flag_types import positive_int
from mer.cli.perplexity_setup import DEFAULT_CONTEXT, PreparedPerplexity, prepare_perplexity, run_perplexity
from mer.cli.pipeline_flags import add_config_flags, add_model_flags
from mer.cli.pipeline_job import _with_signals
from mer.cli.progress import ProgressDisplay
from mer.config import GENERATION, config_overrides
from mer.errors import UsageError
from mer.logging_setup import configure_logging
from mer.models import held_out_text_path, tiny_model_path
from mer.protocol import PerplexityChunk


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "perplexity", help="the perplexity of a text, as llama-perplexity computes it, through the process graph",
        description="Compute a model's perplexity on a text through the process graph, with llama.cpp's "
                    "llama-perplexity rules: the text (BOS first) cut into chunks of --ctx tokens, each run from an "
                    "empty KV cache with BOS as its first token, the second half of each chunk scored. Per-chunk "
                    "values go to stderr; the running values and the final estimate (± its standard error) to "
                    "stdout. Without --model: the tiny model shipped with mer on its shipped held-out text.")
    add_model_flags(parser, ram_budget_help="Bound the graph's resident memory (e.g. 8GiB): the slot arena gets "
                                            "what the dense weights, KV cache and processes leave.")
    parser.add_argument("--file", type=Path, default=None, metavar="TEXT",
                        help="UTF-8 text to score (default without --model: the embedded model's held-out text, "
                             "docs/tiny-model.md; required with --model).")
    parser.add_argument("--ctx", type=positive_int, default=None, metavar="TOKENS",
                        help=f"Tokens per chunk (llama-perplexity's --ctx-size; default {DEFAULT_CONTEXT}, or the "
                             f"model's context if smaller). At most the model's context; the text needs 2 x TOKENS.")
    parser.add_argument("--chunks", type=positive_int, default=None, metavar="N",
                        help="Score at most N chunks (default: every whole chunk of the text).")
    add_config_flags(parser, job=GENERATION, skip=("cache_slots", "record_trace", "record_hidden"))
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the values and the run's figures).")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    configure_logging("mer-supervisor", log_file=args.log_file)
    if args.model is not None and args.file is None:
        raise UsageError("--file TEXT is needed with --model (the shipped held-out text is the embedded model's)")
    model = args.model if args.model is not None else tiny_model_path()
    text = args.file if args.file is not None else held_out_text_path()
    with ProgressDisplay("perplexity") as display:
        prepared = prepare_perplexity(model, text, context=args.ctx, max_chunks=args.chunks, config_path=args.config,
                                      overrides=config_overrides(args), ram_budget=args.ram_budget,
                                      start_phase=display.start_phase)
    return perplexity_and_print(prepared, model=model, text=text, as_json=args.json)


def perplexity_and_print(prepared: PreparedPerplexity, *, model: Path, text: Path, as_json: bool) -> int:
    """Run the job; progress to stderr, then llama-perplexity's lines or the JSON object to stdout."""
    plan = prepared.plan
    say = "mer-pipeline perplexity:"
    if prepared.ram_plan is not None:
        print(f"{say} {prepared.ram_plan.describe()}", file=sys.stderr)
    if prepared.context_note:
        print(f"{say} {prepared.context_note}", file=sys.stderr)
    print(f"{say} {len(plan.tokens)} tokens, {plan.num_chunks} chunks of {plan.context} "
          f"({plan.scored_per_chunk} scored each)", file=sys.stderr, flush=True)
    summary = uvloop.run(run_perplexity(prepared, ChunkProgress(), supervise=_with_signals)).to_json_dict()
    if as_json:
        print(json.dumps({**summary, "model": str(model), "file": str(text)}), flush=True)
        return 0
    print(",".join(f"[{index + 1}]{value:.4f}" for index, value in enumerate(summary["running_ppl"])) + ",")
    print(final_line(summary), flush=True)
    print(timing_line(summary), file=sys.stderr)
    return 0


class ChunkProgress:
    """Prints one stderr line per scored chunk: its value, the running value, its time and what is left."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, message: PerplexityChunk) -> None:
        self.seconds += message.seconds
        done = message.chunk + 1
        left = self.seconds / done * (message.num_chunks - done)
        print(f"mer-pipeline perplexity: [{done}/{message.num_chunks}] {message.running_ppl:.4f} (this chunk "
              f"{math.exp(message.nll / message.count):.4f}, {message.seconds:.2f} s; ~{left:.0f} s left)",
              file=sys.stderr, flush=True)


def final_line(summary: dict[str, Any]) -> str:
    """llama-perplexity's last line: `Final estimate: PPL = 5.1234 +/- 0.01234`."""
    error = summary["ppl_error"]
    if error is None:
        return f"Final estimate: PPL = {summary['ppl']:.4f} (no error estimate: the scored tokens' log-likelihoods " \
               f"have no spread)"
    return f"Final estimate: PPL = {summary['ppl']:.4f} +/- {error:.5f}"


def timing_line(summary: dict[str, Any]) -> str:
    return (f"{summary['chunks']} chunks of {summary['context']} tokens ({summary['scored_tokens']} scored) in "
            f"{summary['seconds']:.1f} s, {summary['tokens_per_s']:.1f} tok/s; expert hit rate "
            f"{summary['hit_rate_pct']:.1f}%, {summary['bytes_read'] / 2**20:.1f} MiB read, "
            f"{summary['compute_workers']} compute workers")
