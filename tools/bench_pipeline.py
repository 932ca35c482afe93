#!/usr/bin/env python3
"""The expert-streaming benchmark through the real process graph, against its own baselines.

Runs `mer-pipeline run --json` on a store (by default the Mixtral-8x7B-shaped synthetic store:
q4_0, 32 x 8 experts of 99,090,432 bytes, written once with `mer-pipeline synth --preset
mixtral-8x7b`) with the seed's settings (flat pool, markov workload, 64 cache slots, 300
iterations) for every combination of compute workers {1, 2} and prefetch {on, off}, interleaved and
repeated (median of `--repeats`), dropping the page cache before every run where permitted. Prints
the seed-format summary of each combination (its median run) and the ratios measured in this same
run: 2 workers vs 1, prefetch vs none, and each run's cycle time vs max(io_wait, compute), the
ideal pipeline.

    python tools/bench_pipeline.py --store /work/stores/mixtral            # the README's figures
    python tools/bench_pipeline.py --quick                                 # tiny store, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mer.metrics.summary import RunSummary, format_seed_block
from page_cache import drop_page_cache  # tools/page_cache.py (tools run as scripts)


def ensure_store(path: Path, preset: str) -> Path:
    if (path / "manifest.json").is_file():
        return path
    print(f"writing the {preset} synthetic store to {path} ...", file=sys.stderr)
    subprocess.run(["mer-pipeline", "synth", "--preset", preset, "--out", str(path)], check=True)
    return path


def run_once(store: Path, args, workers: int, prefetch: bool) -> dict:
    command = ["mer-pipeline", "run", "--store", str(store), "--tokens", str(args.tokens),
               "--cache-slots", str(args.cache_slots), "--workload", "markov", "--seed", str(args.seed),
               "--compute-workers", str(workers), "--json"]
    if not prefetch:
        command.append("--no-prefetch")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(command)}):\n{result.stderr}")
    summary = json.loads(result.stdout)
    summary["process_wall_s"] = time.monotonic() - started
    return summary


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda run: run["sustained_tps"])
    return ordered[len(ordered) // 2]


def ideal_ratio(summary: dict) -> float:
    """Mean cycle per token over max(io_wait, compute) per token: 1.0 is a perfect pipeline."""
    cycle = summary["wall_s"] / summary["tokens"] * 1e6
    return cycle / max(summary["io_wait_us_per_token"], summary["compute_us_per_token"], 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/work/stores/mixtral-8x7b-q4_0"),
                        help="store directory (written with the preset if missing)")
    parser.add_argument("--preset", default="mixtral-8x7b", help="synth preset for a missing store")
    parser.add_argument("--tokens", type=int, default=300, help="iterations per run")
    parser.add_argument("--cache-slots", type=int, default=64, help="cache slots")
    parser.add_argument("--repeats", type=int, default=3, help="runs per combination (median)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="seconds allowed per run")
    parser.add_argument("--quick", action="store_true", help="tiny store, 100 tokens, 4 slots, 1 repeat")
    parser.add_argument("--json", action="store_true", help="print all runs and ratios as JSON on stdout")
    args = parser.parse_args()
    if args.quick:
        args.store, args.preset, args.tokens, args.cache_slots, args.repeats = (
            Path("/tmp/mer-bench-tiny"), "tiny", 100, 4, 1)
    store = ensure_store(args.store, args.preset)
    combinations = [(workers, prefetch) for workers in (1, 2) for prefetch in (True, False)]
    runs: dict[tuple[int, bool], list[dict]] = {combo: [] for combo in combinations}
    dropped = True
    for repeat in range(args.repeats):
        for workers, prefetch in combinations:  # interleaved: every combination once per round
            dropped &= drop_page_cache()
            summary = run_once(store, args, workers, prefetch)
            runs[(workers, prefetch)].append(summary)
            print(f"round {repeat + 1}/{args.repeats} workers={workers} prefetch={'on' if prefetch else 'off'}: "
                  f"{summary['sustained_tps']:.2f} tok/s, hit rate {summary['hit_rate_pct']:.1f}%, "
                  f"I/O share {summary['io_share_pct']:.1f}%", file=sys.stderr)
    medians = {combo: median_run(found) for combo, found in runs.items()}
    ratios = {}
    for prefetch in (True, False):
        label = "prefetch" if prefetch else "no prefetch"
        ratios[f"2 workers vs 1 ({label}), tokens/s"] = (
            medians[(2, prefetch)]["sustained_tps"] / medians[(1, prefetch)]["sustained_tps"])
    for workers in (1, 2):
        ratios[f"prefetch vs none ({workers} workers), tokens/s"] = (
            medians[(workers, True)]["sustained_tps"] / medians[(workers, False)]["sustained_tps"])
    for (workers, prefetch), summary in medians.items():
        ratios[f"cycle vs max(io_wait, compute) ({workers} workers, prefetch {'on' if prefetch else 'off'})"] = (
            ideal_ratio(summary))
    if args.json:
        print(json.dumps({"runs": {f"{w}w-{'prefetch' if p else 'none'}": r for (w, p), r in runs.items()},
                          "ratios": ratios, "page_cache_dropped": dropped}, indent=1))
        return 0
    for (workers, prefetch), summary in medians.items():
        print(f"\n=== compute workers {workers}, prefetch {'on' if prefetch else 'off'} "
              f"(median of {len(runs[(workers, prefetch)])}) ===")
        print(format_seed_block(RunSummary.from_json_dict({k: v for k, v in summary.items() if k != 'process_wall_s'})))
    print("\n=== ratios (same run, medians) ===")
    for name, value in ratios.items():
        print(f"{name:<60} {value:6.2f}x")
    print(f"page cache dropped before each run: {'yes' if dropped else 'no (not permitted)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
