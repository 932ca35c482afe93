"""`mer-pipeline trace simulate FILE`: replay a routing trace offline through the live cache code.

Prints, for each predictor, policy and cache size, the hits, misses, hit rate, stalls, Belady's MIN
misses for the same slots, reads, bytes per token and (when a disk bandwidth and a compute time are
given or measured from a run log) projected seconds per token. `--json` prints
`{"results": [row, ...], ...}` on stdout instead (row keys: `mer.simulate.report`).
"""

from __future__ import annotations

import argparse
import json
import sys

from mer.cache.policy import POLICIES
from mer.cli.flag_types import non_negative_number, positive_int, positive_number
from mer.errors import ConfigError, UsageError
from mer.simulate.predictors import PREDICTOR_NAMES, evaluate_predictor
from mer.simulate.projection import ExpertSizes, resolve_projection_inputs
from mer.simulate.report import format_table, simulation_rows
from mer.simulate.simulator import load_trace


def register(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="work with routing traces (simulate)",
                                   description="Work with routing traces recorded by --record-trace.")
    actions = parser.add_subparsers(dest="trace_action", metavar="ACTION", required=True)
    simulate = actions.add_parser(
        "simulate", help="replay a trace through the cache offline: hit rate, bytes, projected s/token",
        description="Replay a routing trace through the same slot table and cache policies as the live "
        "I/O worker, without reading weights, for each cache size, policy and predictor.")
    simulate.add_argument("file", metavar="FILE", help="the routing trace (JSONL)")
    simulate.add_argument("--cache-slots", required=True, metavar="N[,N...]",
                          help="comma-separated cache sizes in slots, each >= the trace's top_k (e.g. 16,32,64)")
    simulate.add_argument("--policy", default=",".join(POLICIES), metavar="NAME[,NAME...]",
                          help=f"eviction policies, comma-separated: {', '.join(POLICIES)} (default: all)")
    simulate.add_argument("--predictor", default="none", metavar="NAME[,NAME...]",
                          help=f"prefetch predictors, comma-separated: {', '.join(PREDICTOR_NAMES)} (default none)")
    simulate.add_argument("--predict-fanout", type=positive_int, default=2, help="hints per step (default 2, as run)")
    simulate.add_argument("--pipeline-depth", type=positive_int, default=1, help="steps predicted ahead (default 1)")
    sizes = simulate.add_mutually_exclusive_group()
    sizes.add_argument("--store", metavar="DIR", help="expert store: read size per expert from its manifest")
    sizes.add_argument("--expert-bytes", type=positive_int, metavar="N", help="bytes read per expert (without --store)")
    simulate.add_argument("--disk-mbps", type=positive_number, metavar="X", help="disk bandwidth in MB/s (10^6 bytes/s)")
    compute = simulate.add_mutually_exclusive_group()
    compute.add_argument("--compute-ms-per-token", type=non_negative_number, metavar="Y", help="compute time per token in ms")
    compute.add_argument("--from-log", metavar="FILE", help="run log (--log-file) to measure compute per token "
                         "and, unless --disk-mbps is given, the disk bandwidth from")
    simulate.add_argument("--plot", metavar="FILE.png", help="draw hit rate against cache size per policy (PNG)")
    simulate.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    simulate.set_defaults(handler=run_simulate)


def parse_cache_sizes(text: str) -> list[int]:
    """`16,32,64` -> [16, 32, 64]; a UsageError naming the bad entry otherwise."""
    parts = [part.strip() for part in text.split(",")]
    for part in parts:
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--cache-slots {text!r}: {part!r} is not a positive integer (give e.g. 16,32,64)")
    return sorted({int(part) for part in parts})


def parse_names(text: str, known, flag: str) -> list[str]:
    """A comma-separated list of known names, in the order given, without repeats."""
    names = []
    for name in (part.strip() for part in text.split(",")):
        if name not in known:
            kind = "cache policy" if flag == "--policy" else "predictor"
            raise UsageError(f"{flag}: unknown {kind} {name!r}; known: {', '.join(known)}")
        if name not in names:
            names.append(name)
    return names


def run_simulate(args: argparse.Namespace) -> int:
    cache_sizes = parse_cache_sizes(args.cache_slots)
    policies = parse_names(args.policy, list(POLICIES), "--policy")
    predictors = parse_names(args.predictor, list(PREDICTOR_NAMES), "--predictor")
    trace = load_trace(args.file)
    too_small = [size for size in cache_sizes if size < trace.header.top_k]
    if too_small:
        raise ConfigError(f"--cache-slots {too_small[0]} is below the trace's top_k {trace.header.top_k}")
    sizes = (ExpertSizes.from_store(args.store, trace.header, args.file) if args.store
             else ExpertSizes.uniform(args.expert_bytes) if args.expert_bytes is not None else None)
    projection = resolve_projection_inputs(args.disk_mbps, args.compute_ms_per_token, args.from_log)
    notes = []
    if sizes is None:
        notes.append("bytes unknown: give --store DIR or --expert-bytes N for bytes read and the projection")
    elif projection is None:
        notes.append("no projection: give --disk-mbps X with --compute-ms-per-token Y, or --from-log FILE")
    rows = simulation_rows(trace, cache_sizes, policies, predictors, sizes=sizes, projection=projection,
                           predict_fanout=args.predict_fanout, pipeline_depth=args.pipeline_depth)
    scores = [evaluate_predictor(trace, name, args.predict_fanout, args.pipeline_depth)
              for name in predictors if name != "none"]
    if args.plot:
        from mer.simulate.plot import plot_hit_rates

        plot_hit_rates(rows, args.plot, f"{trace.path.name}: {trace.num_tokens} tokens, "
                       f"{trace.header.layers} layer(s) x {trace.header.experts_per_layer} experts, top-{trace.header.top_k}")
    if args.json:
        print(json.dumps(_json_document(trace, sizes, projection, notes, rows, scores)))
        return 0
    print(f"{trace.path}: {trace.num_tokens} tokens, {trace.header.layers} layer(s) x "
          f"{trace.header.experts_per_layer} experts, top-{trace.header.top_k}, {trace.lookups} lookups")
    print(format_table(rows))
    for score in scores:
        print(f"predictor {score.predictor}: {score.hints} hints, {score.precision_pct:.1f}% used by the next "
              f"decision, covering {score.coverage_pct:.1f}% of its lookups")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _json_document(trace, sizes, projection, notes, rows, scores) -> dict:
    return {
        "trace": {"path": str(trace.path), "tokens": trace.num_tokens, "layers": trace.header.layers,
                  "experts_per_layer": trace.header.experts_per_layer, "top_k": trace.header.top_k,
                  "lookups": trace.lookups},
        "expert_bytes": None if sizes is None else sizes.source,
        "projection": None if projection is None else projection.to_json_dict(),
        "notes": notes,
        "predictors": [{"predictor": s.predictor, "hints": s.hints, "hinted_used": s.hinted_used,
                        "precision_pct": s.precision_pct, "coverage_pct": s.coverage_pct} for s in scores],
        "results": rows,
    }
