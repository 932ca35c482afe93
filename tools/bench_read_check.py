#!/usr/bin/env python3
"""The cost of the read path's checksum check, paired: the same `mer-pipeline run` with each
expert's first read checked (the default), with every read checked (`--verify-reads`) and, given
`--baseline-src DIR` (a checkout of mer from before the check, put first on PYTHONPATH), without it.

The variants run interleaved, in a new random order each round, so that a busy machine slows them
alike; each round's ratio to the round's baseline (or, without a baseline, to the default) is a
paired figure, and the medians over the rounds are printed. From each checked run's log it also
takes `payload_checks` (docs/events.md): the crc32's own time summed over the run as a share of the
run's wall time (an upper bound of what the check can add: it runs beside the reads in a helper
thread), and its throughput on the slots it checked.

    python tools/bench_read_check.py --store STORE --baseline-src /tmp/mer-before --rounds 7
    python tools/bench_read_check.py --store STORE --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"baseline": (), "first_read": (), "verify_reads": ("--verify-reads",)}


def run_once(args, variant: str, log_path: Path) -> dict:
    command = ["mer-pipeline", "run", "--store", str(args.store), "--tokens", str(args.tokens), "--cache-slots",
               str(args.cache_slots), "--top-k", str(args.top_k), "--workload", args.workload, "--seed", str(args.seed),
               "--compute-workers", str(args.compute_workers), "--log-file", str(log_path), "--json",
               *VARIANTS[variant]]
    environment = dict(os.environ)
    if variant == "baseline":
        paths = [str(args.baseline_src), environment.get("PYTHONPATH")]
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{variant} run failed ({' '.join(command)}):\n{result.stderr}")
    summary = json.loads(result.stdout)
    checks = [json.loads(line) for line in log_path.read_text().splitlines() if '"payload_checks"' in line]
    summary["checks"] = checks[-1] if checks else None
    return summary


def paired(rounds: list[dict], variant: str, reference: str, key: str) -> float:
    return statistics.median(run[variant][key] / run[reference][key] for run in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="expert store to run on")
    parser.add_argument("--baseline-src", type=Path, help="a checkout of mer without the check (its repository root)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every variant (default 5)")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--cache-slots", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--workload", default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-workers", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    variants = [name for name in VARIANTS if name != "baseline" or args.baseline_src]
    reference = "baseline" if args.baseline_src else "first_read"
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mer-bench-read-check-") as directory:
        for index in range(args.rounds):
            order = random.Random(index).sample(variants, len(variants))
            rounds.append({variant: run_once(args, variant, Path(directory) / f"{index}-{variant}.jsonl")
                           for variant in order})
            print(f"round {index + 1}/{args.rounds}: " + ", ".join(
                f"{variant} {rounds[-1][variant]['wall_s']:.2f} s" for variant in variants), file=sys.stderr)
    figures = {"reference": reference, "rounds": args.rounds, "variants": {}}
    for variant in variants:
        runs = [run[variant] for run in rounds]
        entry = {"median_wall_s": statistics.median(run["wall_s"] for run in runs),
                 "median_tps": statistics.median(run["sustained_tps"] for run in runs),
                 "reads": statistics.median(run["reads"] for run in runs),
                 "paired_wall_ratio": paired(rounds, variant, reference, "wall_s")}
        checked = [run for run in runs if run["checks"]]
        if checked:
            entry["checks"] = statistics.median(run["checks"]["checks"] for run in checked)
            entry["check_share_of_wall_pct"] = statistics.median(
                100 * run["checks"]["check_s"] / run["wall_s"] for run in checked)
            entry["crc32_gbps"] = statistics.median(run["checks"]["gbps"] for run in checked)
        figures["variants"][variant] = entry
    if args.json:
        print(json.dumps(figures))
        return 0
    for variant, entry in figures["variants"].items():
        line = (f"{variant:>12}: wall {entry['median_wall_s']:.3f} s, {entry['median_tps']:.1f} tok/s, "
                f"{entry['reads']:.0f} reads, wall vs {reference} x{entry['paired_wall_ratio']:.3f} (paired median)")
        if "checks" in entry:
            line += (f"; {entry['checks']:.0f} checks, crc32 {entry['crc32_gbps']:.2f} GB/s, "
                     f"{entry['check_share_of_wall_pct']:.1f}% of the wall time")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
