"""`mer-pipeline generate`: text generation from a MoE GGUF through the process graph.

Without `--model` it uses the tiny MoE model shipped inside the package (`mer.models`).

The experts are converted into the cached expert store on first use (progress on stderr); the
router runs the dense part and streams the experts through the I/O worker, the slots and the
compute workers. Generated text streams to stdout as it is produced, then one timing line goes to
stderr. `--json` prints one JSON object instead (nothing else on stdout; nothing at all on error).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import sys
from pathlib import Path
from typing import IO, Any

import uvloop

from mer.cli.flag_types import (non_negative_int, non_negative_number, probability_mass, seed,
                                 utf8_text)
from mer.cli.cluster_flags import add_cluster_flags, cluster_options
from mer.cli.cluster_launch import run_with_cluster
from mer.cli.pipeline_flags import add_config_flags, add_model_flags
from mer.cli.pipeline_job import _with_signals
from mer.cli.progress import ProgressDisplay
from mer.config import GENERATION, config_overrides
from mer.cli.generation_setup import (PreparedGeneration, PromptSpec, SamplerSettings, prepare_generation,
                                 run_generation)
from mer.logging_setup import configure_logging
from mer.model.tokenizer import Tokenizer
from mer.models import tiny_model_path
from mer.protocol import RemoteShardsSpec


def token_id_list(text: str) -> tuple[int, ...]:
    """`1,2,3` -> (1, 2, 3)."""
    try:
        ids = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: token ids must be integers >= 0")
    return ids


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text from a MoE GGUF through the process graph",
        description="Generate text from a Mixture-of-Experts GGUF: the router runs the dense part, the experts "
                    "stream from the expert store (converted once, cached) through the graph. Text goes to "
                    "stdout as it is generated; a timing line goes to stderr.")
    add_model_flags(parser, ram_budget_help="Bound the graph's resident memory (e.g. 8GiB): the slot arena gets "
                                            "what the dense weights, KV cache and processes leave.")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", type=utf8_text, metavar="TEXT", help="Prompt text (BOS added as the GGUF's add_bos_token says).")
    prompt.add_argument("--prompt-tokens", type=token_id_list, metavar="1,2,3",
                        help="Prompt token ids, used exactly as given (no BOS added).")
    parser.add_argument("--chat", action="store_true",
                        help="Render the prompt as one user message with the GGUF's tokenizer.chat_template.")
    parser.add_argument("-n", "--max-tokens", type=non_negative_int, default=64, metavar="N", help="Tokens to generate (64).")
    parser.add_argument("--temperature", type=non_negative_number, default=0.0, metavar="T", help="0 (default): greedy.")
    parser.add_argument("--top-k", dest="sampler_top_k", type=non_negative_int, default=0, metavar="K",
                        help="The sampler's top-k (0: no cut); the routing k always comes from the model.")
    parser.add_argument("--top-p", type=probability_mass, default=1.0, metavar="P", help="Nucleus sampling mass (1.0: no cut).")
    parser.add_argument("--seed", dest="sampler_seed", type=seed, default=None, metavar="S",
                        help="Sampler seed: the same seed gives the same tokens (default: random).")
    parser.add_argument("--ignore-eos", action="store_true", help="Do not stop on end-of-generation tokens.")
    add_config_flags(parser, job=GENERATION, skip=("cache_slots",))
    add_cluster_flags(parser)
    parser.add_argument("--dump-logits", type=Path, metavar="FILE.npy", default=None,
                        help="Save the logits each generated token was chosen from ([tokens, vocab] float32).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (tokens, text, speeds) instead.")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    configure_logging("mer-supervisor", log_file=args.log_file)
    cluster = cluster_options(args)  # checked before anything starts
    model = args.model if args.model is not None else tiny_model_path()
    with ProgressDisplay("generate") as display:
        prepared = prepare_generation(
            model, PromptSpec(args.prompt, args.prompt_tokens, args.chat), max_tokens=args.max_tokens,
            sampler=SamplerSettings(args.temperature, args.sampler_top_k, args.top_p, args.sampler_seed),
            ignore_eos=args.ignore_eos, dump_logits=args.dump_logits, config_path=args.config,
            overrides=config_overrides(args), ram_budget=args.ram_budget, start_phase=display.start_phase)

    def generate_on(remote_shards: RemoteShardsSpec | None) -> int:
        start = dataclasses.replace(prepared.start, remote_shards=remote_shards)
        return generate_and_print(dataclasses.replace(prepared, start=start), as_json=args.json)

    return run_with_cluster(cluster, prepared.config.store, prepared.config, generate_on, "generate")


def generate_and_print(prepared: PreparedGeneration, *, as_json: bool, command: str = "generate") -> int:
    """Run the generation; stream its text to stdout and the timing line to stderr, or print the JSON."""
    if prepared.ram_plan is not None:
        print(f"mer-pipeline {command}: {prepared.ram_plan.describe()}", file=sys.stderr)
    stream = None if as_json else TextStream(prepared.tokenizer)
    summary = uvloop.run(run_generation(prepared, None if stream is None else stream.add,
                                        supervise=_with_signals)).to_json_dict()
    if stream is not None:
        stream.finish()
        print(timing_line(summary), experts_line(summary), sep="\n", file=sys.stderr)
        return 0
    plan = prepared.ram_plan
    extra = {"ram_budget_bytes": plan.budget if plan else None, "arena_bytes": plan.arena_nbytes if plan else None}
    print(json.dumps(json_result(summary, prepared.tokenizer, extra)), flush=True)
    return 0


class TextStream:
    """Prints generated tokens' text as it comes; a character split over tokens waits for its last byte."""

    def __init__(self, tokenizer: Tokenizer, stream: IO[str] | None = None):
        self.tokenizer = tokenizer
        self.stream = stream or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, index: int, token: int) -> None:
        self.write(self.decoder.decode(self.tokenizer.token_bytes(token)))

    def write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()

    def finish(self) -> None:
        self.write(self.decoder.decode(b"", final=True))
        self.stream.write("\n")
        self.stream.flush()


def timing_line(summary: dict[str, Any]) -> str:
    """One line: prefill and decode speed, hit rate, MiB read per token, per-block costs, stop reason."""
    prompt, steps = len(summary["prompt_tokens"]), summary["decode_steps"]
    return (f"prefill {prompt} tokens {summary['prefill_tps']:.1f} tok/s, decode {steps} steps "
            f"{summary['decode_tps']:.1f} tok/s, hit rate prefill {summary['prefill_hit_rate_pct']:.1f}% decode "
            f"{summary['decode_hit_rate_pct']:.1f}%, "
            f"{summary['mib_read_per_token']:.2f} MiB read per token; per MoE block: dense "
            f"{summary['dense_us_per_block']:.0f} us, experts {summary['expert_us_per_block']:.0f} us; "
            f"{len(summary['tokens'])} tokens, stop: {summary['stop_reason']}")


def experts_line(summary: dict[str, Any]) -> str:
    """One line: how the expert lookups were served, and each predictor's accuracy (the gate's per layer)."""
    line = (f"experts: {summary['lookups']} lookups, {summary['hits']} hits, {summary['prefetch_joins']} joined a "
            f"prefetch read, {summary['demand_misses']} demand misses")
    for name, entry in summary.get("predictors", {}).items():
        line += (f"; {name}: top-1 {entry['top1_accuracy_pct']:.1f}%, top-k {entry['topk_accuracy_pct']:.1f}%, "
                 f"{entry['used']}/{entry['issued']} prefetches used")
        layers = [f"layer {layer['layer']}" + (f" ({layer['ahead']} ahead)" if layer["ahead"] > 1 else "")
                  + f" {layer['topk_accuracy_pct']:.1f}/{layer['top1_accuracy_pct']:.1f}%"
                  for layer in entry.get("per_layer", [])]
        if layers:
            line += f" (per layer top-k/top-1: {', '.join(layers)})"
    return line


def json_result(summary: dict[str, Any], tokenizer: Tokenizer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `--json` object: the run summary plus `text` (the completion only)."""
    return {**summary, "text": tokenizer.decode(list(summary["tokens"])), **(extra or {})}
