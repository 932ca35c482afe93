"""`mer-pipeline convert MODEL.gguf --out DIR`: turn a MoE GGUF into an expert store.

stdout carries only the result (one line, or one JSON object with --json); progress (see
`mer.cli.progress`) goes to stderr, and so do the JSON events unless `--log-file` names a file
(`mer-pipeline logs summarize` reads it).
"""

from __future__ import annotations

import argparse
import json

from mer.cli.progress import ProgressDisplay
from mer.compute.expert_format import LAYOUTS
from mer.logging_setup import configure_logging
from mer.store.convert import ConversionResult, convert_gguf
from mer.store.shard_choice import parse_shard


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Mixture-of-Experts GGUF into an expert store",
        description="Copy every expert's gate/up/down matrices from a MoE GGUF into an expert store, "
                    "byte for byte (never requantized). Dense weights stay in the GGUF.",
    )
    parser.add_argument("model", metavar="MODEL.gguf",
                        help="the GGUF file; for a split model NAME-00001-of-0000N.gguf (any part finds the rest)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the store directory to create (atomically)")
    parser.add_argument("--layout", choices=LAYOUTS, default="native",
                        help="native: GGUF blocks verbatim (default); "
                             "planar: blocks permuted losslessly for mer's kernels")
    parser.add_argument("--shard", default=None, metavar="i/N",
                        help="write only the experts shard i (0-based) of N holds (a shard store for scale-out)")
    parser.add_argument("--shard-map", default=None, metavar="MAP.json",
                        help="the expert -> shard map for --shard (default: the uniform map of N shards)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing store (or empty directory) at --out")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object {out, experts, bytes, seconds, source_hash[, shard]} "
                             "instead of a line")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--log-file", default=None, metavar="FILE",
                        help="append the JSON events (convert_started, convert_layer_done, convert_done) to FILE "
                             "(without it, only warnings are logged, to stderr)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    configure_logging("mer-convert", log_file=args.log_file)  # its events to the log file; stderr: warnings
    shard = parse_shard(args.shard) if args.shard is not None else None
    with ProgressDisplay("convert", enabled=not args.quiet) as display:
        result = convert_gguf(args.model, args.out, layout=args.layout, force=args.force,
                              start_phase=display.start_phase, shard=shard, shard_map=args.shard_map)
    print(json.dumps(result.to_dict()) if args.json else describe(result))
    return 0


def describe(result: ConversionResult) -> str:
    """The one-line human result: experts, bytes (MiB), destination, time, rate and source hash."""
    rate = result.nbytes / max(result.seconds, 1e-9) / 1e6
    shard = f" of shard {result.shard.index}/{result.shard.count}" if result.shard is not None else ""
    return (f"converted {result.num_experts} experts{shard} ({result.nbytes / 2**20:.1f} MiB) into {result.out} "
            f"in {result.seconds:.2f} s ({rate:.0f} MB/s); source hash {result.source_hash}")
