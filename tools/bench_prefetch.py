#!/usr/bin/env python3
"""Does prefetch pay? Every predictor against no prefetch, in paired runs through the real graph.

Three workloads, each with its own store and cache (issue 6):

- `markov`: the seed's clustered Markov routing on the Mixtral-8x7B-shaped synthetic store
  (q4_0, 256 experts of 99,090,432 bytes), flat pool, 64 cache slots;
- `skewed`: Zipf routing (s = 1.2) where a token repeats the previous token's experts with
  probability 0.7, same store and cache;
- `replay`: the routing the embedded trained model (mer/models/tiny-moe-q8_0.gguf) made while
  generating (`mer-pipeline generate --record-trace`, sampled at T = 0.7 after "def "), replayed
  `--layered` on a synthetic store with that model's geometry (4 layers x 8 experts, top-2) but
  Mixtral-sized q4_0 experts, with a cache of a quarter of its experts (8 slots).

Modes: `none` (no prefetch), each predictor alone (`markov`, `locality`, `affinity`; governor off)
and `fused` (all three fused, governor on at `--governor-threshold`). A prefetch run's arena holds
`cache_slots + predict_fanout` slots (the prefetch reserve), so `none` runs with that many cache
slots: every mode has the same RAM.

The host drifts by 25-30% between runs, so runs are compared in pairs: each round runs `none`
first, then every prefetch mode (`fused` right after `none`, the others in an order that rotates
by round), and each mode's tokens/s is divided by the same round's `none`. The table gives, per
mode, the median over rounds of tokens/s and of that ratio with its spread (min-max), and the
medians of demand misses (stalls: reads the foreground had to start), joins (misses that joined a
prefetch already in flight), hit rate, I/O share, GB read per token and the prefetch counters.
`MIN misses` is Belady's optimum for a demand-fetch cache of the same size on the same routing (the
trace the first `none` run recorded, replayed by `mer-pipeline trace simulate --policy belady`);
`gap closed` = (none's stalls - the mode's stalls) / (none's stalls - MIN misses).

    python tools/bench_prefetch.py                       # the README's table (~45 min here)
    python tools/bench_prefetch.py --quick               # tiny stores, 1 pair: a smoke test
    python tools/bench_prefetch.py --workloads replay --pairs 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from page_cache import drop_page_cache  # tools/page_cache.py (tools run as scripts)

STORES = Path("/work/stores")  # where the stores and the recorded trace live unless --data says otherwise
TRACES = Path("/work/traces")
PREDICTOR_MODES = ("markov", "locality", "affinity")
ALL_MODES = ("none", "fused", *PREDICTOR_MODES)


@dataclass
class Workload:
    name: str
    store: Path
    synth: list[str]  # `mer-pipeline synth` flags that write the store when it is missing
    cache_slots: int
    flags: list[str]  # `mer-pipeline run` flags of the workload
    trace: Path | None = None  # the routing to replay, recorded from the embedded model when missing


@dataclass
class ModeRuns:
    runs: list[dict] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def workloads(args) -> dict[str, Workload]:
    mixtral_synth = ["--preset", "mixtral-8x7b"]
    replay_synth = ["--layers", "4", "--experts", "8", "--top-k", "2", "--d-model", "4096", "--d-ff", "14336",
                    "--dtype", "q4_0"]
    stores, traces = (Path(args.data), Path(args.data)) if args.data else (STORES, TRACES)
    mixtral, replay_store, slots, replay_slots = (stores / "mixtral-8x7b-q4_0",
                                                  stores / "tiny-geometry-mixtral-q4_0", 64, 8)
    if args.quick:
        mixtral_synth, replay_synth = ["--preset", "tiny"], replay_synth[:6] + ["--d-model", "256", "--d-ff", "512",
                                                                                 "--dtype", "q4_0"]
        base = Path(args.data) if args.data else Path("/tmp")
        mixtral, replay_store, slots = base / "mer-bench-tiny", base / "mer-bench-tiny-geometry", 4
    trace = traces / "tiny-moe-sampled.trace"
    return {
        "markov": Workload("markov", mixtral, mixtral_synth, slots, ["--workload", "markov"]),
        "skewed": Workload("skewed", mixtral, mixtral_synth, slots,
                           ["--workload", "skewed", "--zipf-s", "1.2", "--workload-correlation", "0.7"]),
        "replay": Workload("replay", replay_store, replay_synth, replay_slots,
                           ["--workload", "replay", "--layered", "--trace", str(trace)], trace),
    }


def cli(*arguments: str, timeout_s: float, capture: bool = True) -> subprocess.CompletedProcess:
    command = ["mer-pipeline", *arguments]
    result = subprocess.run(command, capture_output=capture, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr if capture else ''}")
    return result


def prepare(workload: Workload, timeout_s: float) -> None:
    if not (workload.store / "manifest.json").is_file():
        print(f"writing the store {workload.store} ...", file=sys.stderr)
        cli("synth", *workload.synth, "--out", str(workload.store), "--quiet", timeout_s=timeout_s)
    if workload.trace is not None and not workload.trace.is_file():
        print(f"recording the embedded model's routing to {workload.trace} ...", file=sys.stderr)
        workload.trace.parent.mkdir(parents=True, exist_ok=True)
        cli("generate", "--prompt", "def ", "-n", "300", "--temperature", "0.7", "--seed", "1",
            "--record-trace", str(workload.trace), timeout_s=timeout_s)


def mode_flags(mode: str, args) -> list[str]:
    if mode == "none":
        return ["--no-prefetch"]
    if mode == "fused":
        return ["--predictors", ",".join(PREDICTOR_MODES), "--governor-threshold", str(args.governor_threshold)]
    return ["--predictors", mode]


def run_once(workload: Workload, mode: str, args, record_trace: Path | None) -> dict:
    slots = workload.cache_slots + (args.predict_fanout if mode == "none" else 0)  # equal arenas
    flags = ["run", "--store", str(workload.store), "--tokens", str(args.tokens), "--cache-slots", str(slots),
             "--predict-fanout", str(args.predict_fanout), "--seed", str(args.seed),
             "--compute-workers", str(args.compute_workers), "--json", *workload.flags, *mode_flags(mode, args)]
    if record_trace is not None:
        flags += ["--record-trace", str(record_trace)]
    drop_page_cache()
    started = time.monotonic()
    summary = json.loads(cli(*flags, timeout_s=args.timeout_s).stdout)
    summary["process_wall_s"] = time.monotonic() - started
    return summary


def min_misses(trace: Path, cache_slots: int, timeout_s: float) -> dict:
    """Belady's MIN and LRU (no prefetch) on the recorded routing, `cache_slots` slots."""
    result = cli("trace", "simulate", str(trace), "--cache-slots", str(cache_slots), "--policy", "lru,belady",
                 "--json", timeout_s=timeout_s)
    rows = {row["policy"]: row for row in json.loads(result.stdout)["results"]}
    return {"min_misses": rows["belady"]["misses"], "lru_misses": rows["lru"]["misses"]}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_workload(workload: Workload, modes: list[str], args) -> dict:
    prepare(workload, args.timeout_s)
    results = {mode: ModeRuns() for mode in modes}
    trace = Path(args.workdir) / f"{workload.name}-routing.trace"
    others = [mode for mode in modes if mode not in ("none", "fused")]
    for round_index in range(args.pairs):
        shift = round_index % max(len(others), 1)
        order = ["none"] + (["fused"] if "fused" in modes else []) + others[shift:] + others[:shift]
        baseline = None
        for mode in order:
            summary = run_once(workload, mode, args, trace if (mode == "none" and round_index == 0) else None)
            results[mode].runs.append(summary)
            if mode == "none":
                baseline = summary["sustained_tps"]
            ratio = summary["sustained_tps"] / baseline
            results[mode].ratios.append(ratio)
            print(f"[{workload.name}] round {round_index + 1}/{args.pairs} {mode:>8}: "
                  f"{summary['sustained_tps']:6.2f} tok/s ({ratio:4.2f}x none), stalls {summary['demand_misses']}, "
                  f"joins {summary['prefetch_joins']}, hit rate {summary['hit_rate_pct']:5.1f}%, "
                  f"prefetches {summary['prefetches_issued']} issued / {summary['prefetches_used']} used",
                  file=sys.stderr, flush=True)
    optimum = min_misses(trace, workload.cache_slots + args.predict_fanout, args.timeout_s)
    return {"workload": workload.name, "cache_slots": workload.cache_slots, "store": str(workload.store),
            **optimum, "modes": {mode: table_row(found, optimum) for mode, found in results.items()},
            "runs": {mode: found.runs for mode, found in results.items()}}


def table_row(found: ModeRuns, optimum: dict) -> dict:
    runs = found.runs

    def of(key: str) -> float:
        return median([float(run[key]) for run in runs])

    stalls = of("demand_misses")
    gb_per_token = median([run["bytes_read"] / run["tokens"] / 1e9 for run in runs])
    return {
        "tps": of("sustained_tps"), "ratio": median(found.ratios), "ratio_min": min(found.ratios),
        "ratio_max": max(found.ratios), "pairs": len(found.ratios), "stalls": stalls, "joins": of("prefetch_joins"),
        "hit_rate_pct": of("hit_rate_pct"), "io_share_pct": of("io_share_pct"), "gb_per_token": gb_per_token,
        "issued": of("prefetches_issued"), "used": of("prefetches_used"), "wasted": of("prefetches_wasted"),
        "dropped": of("prefetches_dropped"),
    }


def add_gap_closed(result: dict) -> None:
    none = result["modes"].get("none")
    gap = (none["stalls"] - result["min_misses"]) if none else 0
    for row in result["modes"].values():
        row["gap_closed"] = (none["stalls"] - row["stalls"]) / gap if gap > 0 else float("nan")


def print_table(result: dict, args) -> None:
    print(f"\n=== {result['workload']}: {result['store']}, cache {result['cache_slots']} slots "
          f"+ {args.predict_fanout} (prefetch reserve; none gets them as cache), {args.tokens} tokens, "
          f"{args.pairs} pairs ===")
    print(f"MIN misses {result['min_misses']} (LRU simulated {result['lru_misses']}) at "
          f"{result['cache_slots'] + args.predict_fanout} slots")
    header = (f"{'mode':<9}{'tok/s':>7}{'vs none (min-max)':>20}{'stalls':>8}{'joins':>7}{'hit %':>7}"
              f"{'I/O %':>7}{'GB/tok':>8}{'issued':>8}{'used':>6}{'wasted':>7}{'gap closed':>11}")
    print(header)
    for mode, row in result["modes"].items():
        print(f"{mode:<9}{row['tps']:7.2f}{row['ratio']:9.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
              f"{row['stalls']:8.0f}{row['joins']:7.0f}{row['hit_rate_pct']:7.1f}{row['io_share_pct']:7.1f}"
              f"{row['gb_per_token']:8.2f}{row['issued']:8.0f}{row['used']:6.0f}{row['wasted']:7.0f}"
              f"{row['gap_closed'] * 100:10.0f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="markov,skewed,replay", help="comma-separated: markov, skewed, replay")
    parser.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated: " + ", ".join(ALL_MODES))
    parser.add_argument("--pairs", type=int, default=5, help="rounds (each mode paired with the round's none)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per run")
    parser.add_argument("--predict-fanout", type=int, default=2, help="hints per prediction (= prefetch reserve)")
    parser.add_argument("--governor-threshold", type=float, default=0.3, help="the fused mode's governor")
    parser.add_argument("--compute-workers", type=int, default=2, help="compute workers")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="seconds allowed per run")
    parser.add_argument("--workdir", default="/tmp/mer-bench-prefetch", help="recorded traces go here")
    parser.add_argument("--data", help=f"directory for the stores and the model's trace (default {STORES} and "
                                       f"{TRACES}; /tmp with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny stores, 40 tokens, 1 pair")
    parser.add_argument("--json", action="store_true", help="print every run and the table as JSON on stdout")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.pairs = 40, 1
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    known = workloads(args)
    chosen = [name.strip() for name in args.workloads.split(",")]
    modes = [name.strip() for name in args.modes.split(",")]
    for name in chosen:
        if name not in known:
            parser.error(f"--workloads: unknown workload {name!r} (known: {', '.join(known)})")
    for mode in modes:
        if mode not in ALL_MODES:
            parser.error(f"--modes: unknown mode {mode!r} (known: {', '.join(ALL_MODES)})")
    if "none" not in modes:
        parser.error("--modes must include none (every ratio is against it)")
    results = []
    for name in chosen:
        result = run_workload(known[name], modes, args)
        add_gap_closed(result)
        results.append(result)
        if not args.json:
            print_table(result, args)
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
