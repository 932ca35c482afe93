"""`mer-pipeline logs`: summaries, comparisons, plots and token timelines from a run's JSON log.

Subcommands (docs/events.md describes the events they read):

- `summarize FILE... [--json]`: say what kind of log each run is (`mer.logs.kinds`: run, generate,
  perplexity, convert) and recompute its summary from the raw events: a benchmark run's as `run` computed it
  (`--json`: the keys of `run --json`), a generation's (`mer.logs.generation`; `--json`: the keys of
  `generate --json` with counts for the token lists, `kind: "generate"`), a perplexity run's
  (`mer.logs.perplexity`; `kind: "perplexity"`), a conversion's (`mer.logs.conversion`; `kind: "convert"`). One JSON object per run, one per line.
- `compare A B [C...] [--json]`: the summaries side by side with ratios against A; a FILE may also
  be the output of `run --json`.
- `plot FILE --out DIR`: PNG plots of one run.
- `timeline FILE --token N [--json]`: what happened to one token in every process, in time order.

Warnings (partial last line, no run summary, ...) go to stderr; results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mer.cli.flag_types import non_negative_int, positive_int
from mer.errors import EventLogError, MerError, os_error_reason
from mer.logs.compare import compare_summaries, format_comparison
from mer.logs.conversion import format_conversion, summarize_conversion
from mer.logs.generation import format_generation, summarize_generation
from mer.logs.kinds import CONVERT, DESCRIPTIONS, GENERATE, PERPLEXITY, RUN, kind_line, log_kind
from mer.logs.perplexity import format_perplexity, summarize_perplexity
from mer.logs.recompute import recompute_summary
from mer.logs.runs import RunLog, load_runs, select_run
from mer.metrics.summary import RunSummary, format_seed_block


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "logs", help="analyse the JSON log of a run (--log-file): summarize, compare, plot, timeline",
        description="Answer 'why was this run slow?' from the log a run wrote with --log-file.",
    )
    commands = parser.add_subparsers(dest="logs_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: _help(parser))

    summarize = commands.add_parser("summarize", help="say what kind of log it is and summarize it from its events",
                                    description="Name the kind of each log (run: a benchmark; generate; convert) "
                                                "and recompute its summary from the raw events: a benchmark's "
                                                "exactly as the run computed it; a generation's prefill and decode "
                                                "tok/s, hit rates, MiB read per token and time per MoE block; a "
                                                "conversion's experts, tensors, bytes and time.")
    summarize.add_argument("files", nargs="+", metavar="FILE", help="JSON-lines log files (--log-file)")
    summarize.add_argument("--json", action="store_true",
                           help="one JSON object per run on stdout: a benchmark's with the keys of `run --json`, "
                                "a generation's and a conversion's with `kind` first")
    _add_common(summarize)
    summarize.set_defaults(handler=run_summarize)

    compare = commands.add_parser("compare", help="compare runs side by side, with ratios against the first",
                                  description="Compare the summaries of runs: ratios against the first, and "
                                              "the metrics that changed most. A FILE is a log or the output "
                                              "of `run --json`.")
    compare.add_argument("files", nargs="+", metavar="FILE", help="two or more logs (or `run --json` outputs)")
    compare.add_argument("--json", action="store_true", help="the comparison as one JSON object")
    _add_common(compare)
    compare.set_defaults(handler=run_compare)

    plot = commands.add_parser("plot", help="write PNG plots of one run",
                               description="Cycle latency and its split, rolling hit rate, slot occupancy, "
                                           "I/O queue depth, read latency histogram, per-worker busy "
                                           "timeline and prefetches of one run, as PNG files.")
    plot.add_argument("file", metavar="FILE", help="a JSON-lines log file")
    plot.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the PNG files")
    plot.add_argument("--window", type=positive_int, default=50, metavar="N",
                      help="tokens in the rolling hit-rate window (default 50)")
    _add_common(plot)
    plot.set_defaults(handler=run_plot)

    timeline = commands.add_parser("timeline", help="what happened to one token, across all processes",
                                   description="Every logged step of one token (acquire, reads, compute per "
                                               "worker, combine, warnings) in time order, in ms since the "
                                               "token started.")
    timeline.add_argument("file", metavar="FILE", help="a JSON-lines log file")
    timeline.add_argument("--token", required=True, type=non_negative_int, metavar="N", help="the token (iteration) number")
    timeline.add_argument("--json", action="store_true", help="the steps as a JSON list")
    _add_common(timeline)
    timeline.set_defaults(handler=run_timeline)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="RUN_ID", default=None,
                        help="the run to read when a log file holds several (8 hex characters)")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip malformed lines with a warning instead of failing")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _warn(messages: list[str]) -> None:
    for message in dict.fromkeys(messages):  # once each, in order
        print(f"mer-pipeline logs: warning: {message}", file=sys.stderr)


def _runs_of(path: str, args: argparse.Namespace) -> list[RunLog]:
    runs = load_runs(path, skip_malformed=args.skip_malformed)
    if args.run is not None:
        runs = [select_run(runs, args.run)]
    _warn([warning for run in runs for warning in run.warnings])
    return runs


def _one_run(path: str, args: argparse.Namespace) -> RunLog:
    return select_run(_runs_of(path, args), None)


def _summary_of(run: RunLog) -> tuple[str, Any, list[str]]:
    """(kind, summary, warnings) of one run of a log; EventLogError for a kind with nothing to summarize."""
    kind = log_kind(run)
    if kind == RUN:
        result = recompute_summary(run)
        return kind, result.summary, result.warnings
    if kind == GENERATE:
        generation = summarize_generation(run)
        return kind, generation.summary, generation.warnings
    if kind == CONVERT:
        conversion = summarize_conversion(run)
        return kind, conversion.summary, conversion.warnings
    if kind == PERPLEXITY:
        perplexity = summarize_perplexity(run)
        return kind, perplexity.summary, perplexity.warnings
    names = ", ".join(sorted({event["event"] for event in run.events})[:12])
    raise EventLogError(f"{run.label}: log kind {kind} ({DESCRIPTIONS[kind]}): no run_started, generation_started, "
                        f"perplexity_started or convert_started event, nothing to summarize (events: {names})")


def _summary_text(kind: str, summary: Any) -> str:
    if kind == RUN:
        return format_seed_block(summary)
    if kind == PERPLEXITY:
        return format_perplexity(summary)
    return format_generation(summary) if kind == GENERATE else format_conversion(summary)


def run_summarize(args: argparse.Namespace) -> int:
    blocks = []
    for path in args.files:
        for run in _runs_of(path, args):
            kind, summary, warnings = _summary_of(run)
            _warn(warnings)
            blocks.append((run, kind, summary))
    for index, (run, kind, summary) in enumerate(blocks):
        if args.json:
            print(json.dumps(summary.to_json_dict()))
            continue
        if len(blocks) > 1:
            print(("\n" if index else "") + f"== {run.label}")
        print(kind_line(kind))
        print(_summary_text(kind, summary))
    return 0


def _summary_json_file(path: str) -> dict[str, Any] | None:
    """The summary in `path` when it is the output of `run --json` (one JSON object), else None."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and "event" not in data and "wall_s" in data:
        RunSummary.from_json_dict(data)  # raises EventLogError naming a missing field
        return data
    return None


def _compare_inputs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    summaries, labels = [], []
    for path in args.files:
        summary = _summary_json_file(path)
        if summary is not None:
            summaries.append(summary)
            labels.append(path)
            continue
        runs = _runs_of(path, args)
        for run in runs:
            if (kind := log_kind(run)) != RUN:
                raise EventLogError(f"{run.label}: log kind {kind} ({DESCRIPTIONS[kind]}): compare reads "
                                    "benchmark runs only")
            result = recompute_summary(run)
            _warn(result.warnings)
            summaries.append(result.summary.to_json_dict())
            labels.append(run.label if len(runs) > 1 else path)
    return summaries, labels


def run_compare(args: argparse.Namespace) -> int:
    summaries, labels = _compare_inputs(args)
    if len(summaries) < 2:
        raise EventLogError(f"compare needs at least two runs; the files given hold {len(summaries)}")
    comparison = compare_summaries(summaries, labels)
    print(json.dumps(comparison.to_json_dict()) if args.json else format_comparison(comparison))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from mer.logs.plots import write_plots  # matplotlib is imported only when plotting

    if args.window < 1:
        raise EventLogError(f"--window must be at least 1 token, got {args.window}")
    try:  # before the (possibly long) reading of the log
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MerError(f"{args.out}: cannot create the plot directory: {os_error_reason(error)}") from None
    report = write_plots(_one_run(args.file, args), args.out, window=args.window)
    _warn([f"{name}.png not written: {why}" for name, why in report.skipped])
    for path in report.written:
        print(path)
    return 0


def run_timeline(args: argparse.Namespace) -> int:
    from mer.logs.timeline import format_timeline, token_timeline

    run = _one_run(args.file, args)
    entries = token_timeline(run, args.token)
    print(json.dumps([entry.to_json_dict() for entry in entries]) if args.json
          else format_timeline(run, args.token, entries))
    return 0
