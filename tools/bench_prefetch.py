#!/usr/bin/env python3
"""Does prefetch pay? Every predictor against no prefetch, in paired runs through the real graph.

Three workloads, each with its own store and cache (issue 6):

- `markov`: the seed's clustered Markov routing on the Mixtral-8x7B-shaped synthetic store
  (q4_0, 256 experts of 99,090,432 bytes), flat pool, 64 cache slots;
- `skewed`: Zipf routing (s = 1.2) where a token repeats the previous token's experts with
  probability 0.7, same store and cache;
- `replay`: the routing the embedded trained model (mer/models/tiny-moe-q8_0.gguf) made while
  generating (`mer-pipeline generate --record-trace --record-hidden`, sampled at T = 0.7 after
  "def ", with each decision's residual), replayed `--layered` on a synthetic store with that
  model's geometry (read from it: 6 layers x 8 experts, top-2) but Mixtral-sized q4_0 experts, with a
  cache of a quarter of its experts (12 slots). The store and the trace are named by the geometry
  and the model file's digest, so a new embedded model never replays an old one's routing.

Modes (`MODES`): `none` (no prefetch, LRU), each predictor alone with the governor off (`markov`,
`locality`, `affinity`, and on the replay `gate`: the model's next-layer gates applied to the
recorded residuals), `fused` (every predictor the workload allows, fused, governor on at
`--governor-threshold`), and on the replay two more that change the eviction policy to `layer`
(evict the expert whose layer comes back last): `none+layer` (no prefetch) and `fused+layer`, so
the table separates what the policy does from what prefetch does. A prefetch run's arena holds
`cache_slots + predict_fanout` slots (the prefetch reserve); `none` runs get them as cache slots,
so every mode has the same RAM.

The host drifts by 25-30% between runs, so runs are compared in pairs: each round runs `none`,
then every other mode (`fused` right after `none`, the rest in an order that rotates by round),
every other round in reverse order (ABBA, so steady drift cancels), and each mode's tokens/s is
divided by the same round's `none`. The table gives, per mode,
the median over rounds of tokens/s and of that ratio with its spread (min-max), and the medians of
demand misses (stalls: reads the foreground had to start), joins (misses that joined a prefetch
read already in flight), hit rate, I/O share, GB read per token and the prefetch counters. `MIN
misses` is Belady's optimum for a demand-fetch cache of the same size on the same routing (the trace
the first `none` run recorded, replayed by `mer-pipeline trace simulate --policy belady`);
`gap closed` = (none's stalls - the mode's stalls) / (none's stalls - MIN misses).

    python tools/bench_prefetch.py                       # the README's table (~75 min here)
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
PREDICTORS = ("markov", "locality", "affinity")
MODES = ("none", "fused", "fused+layer", "markov", "locality", "affinity", "gate", "none+layer")
REPLAY_ONLY = ("gate", "fused+layer", "none+layer")  # need a model's residuals, or layers to cycle through


@dataclass
class Workload:
    name: str
    store: Path
    synth: list[str]  # `mer-pipeline synth` flags that write the store when it is missing
    cache_slots: int
    predict_fanout: int
    tokens: int
    flags: list[str]  # `mer-pipeline run` flags of the workload
    trace: Path | None = None  # the routing to replay, recorded from the embedded model when missing
    trace_tokens: int = 300  # how many tokens that recording generates

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.trace is not None else tuple(m for m in MODES if m not in REPLAY_ONLY)


@dataclass
class ModeRuns:
    runs: list[dict] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def tiny_model() -> str:
    from mer.models import tiny_model_path

    return str(tiny_model_path())


def tiny_model_geometry() -> tuple[int, int, int, str]:
    """The embedded model's MoE layers, experts per layer, top-k, and a short digest of the file (the
    replay's store and trace are named by them, so a new embedded model never reuses the old ones)."""
    import hashlib

    from mer.model.model import MoEModel

    path = Path(tiny_model())
    model = MoEModel.load(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return len(model.moe_layers), model.hparams.num_experts, model.hparams.top_k, digest


def workloads(args) -> dict[str, Workload]:
    layers, experts, top_k, digest = tiny_model_geometry()
    mixtral_synth = ["--preset", "mixtral-8x7b"]
    replay_synth = ["--layers", str(layers), "--experts", str(experts), "--top-k", str(top_k), "--d-model", "4096",
                    "--d-ff", "14336", "--dtype", "q4_0"]
    geometry = f"{layers}x{experts}"
    stores, traces = (Path(args.data), Path(args.data)) if args.data else (STORES, TRACES)
    mixtral, replay_store, slots = stores / "mixtral-8x7b-q4_0", stores / f"tiny-geometry-{geometry}-mixtral-q4_0", 64
    if args.quick:
        mixtral_synth, replay_synth = ["--preset", "tiny"], replay_synth[:6] + ["--d-model", "256", "--d-ff", "512",
                                                                                 "--dtype", "q4_0"]
        base = Path(args.data) if args.data else Path("/tmp")
        mixtral, replay_store, slots = base / "mer-bench-tiny", base / f"mer-bench-tiny-geometry-{geometry}", 4
    flat_tokens, replay_tokens = args.tokens or (40 if args.quick else 200), args.tokens or (40 if args.quick else 100)
    trace_tokens = max(64 if args.quick else 300, replay_tokens)  # the replay reads replay_tokens of them
    trace = traces / f"tiny-moe-{digest}-sampled-hidden-{trace_tokens}.trace"
    return {
        "markov": Workload("markov", mixtral, mixtral_synth, slots, 2, flat_tokens, ["--workload", "markov"]),
        "skewed": Workload("skewed", mixtral, mixtral_synth, slots, 2, flat_tokens,
                           ["--workload", "skewed", "--zipf-s", "1.2", "--workload-correlation", "0.7"]),
        "replay": Workload("replay", replay_store, replay_synth, layers * experts // 4, 4, replay_tokens,
                           ["--workload", "replay", "--layered", "--trace", str(trace)], trace, trace_tokens),
    }


def cli(*arguments: str, timeout_s: float) -> subprocess.CompletedProcess:
    command = ["mer-pipeline", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr}")
    return result


def prepare(workload: Workload, timeout_s: float) -> None:
    if not (workload.store / "manifest.json").is_file():
        print(f"writing the store {workload.store} ...", file=sys.stderr)
        cli("synth", *workload.synth, "--out", str(workload.store), "--quiet", timeout_s=timeout_s)
    if workload.trace is not None and not workload.trace.is_file():
        print(f"recording the embedded model's routing to {workload.trace} ...", file=sys.stderr)
        workload.trace.parent.mkdir(parents=True, exist_ok=True)
        cli("generate", "--prompt", "def ", "-n", str(workload.trace_tokens), "--temperature", "0.7", "--seed", "1",
            "--record-trace", str(workload.trace), "--record-hidden", timeout_s=timeout_s)


def mode_flags(mode: str, workload: Workload, args) -> list[str]:
    """The `run` flags of `mode` on `workload` (the replay's predictors include the gate)."""
    gate = ["--gate-model", tiny_model()]
    policy = ["--cache-policy", "layer"] if mode.endswith("+layer") else []
    if mode.startswith("none"):
        return ["--no-prefetch", *policy]
    if mode.startswith("fused"):
        names = [*PREDICTORS, *(["gate"] if workload.trace is not None else [])]
        return ["--predictors", ",".join(names), "--governor-threshold", str(args.governor_threshold), *policy,
                *(gate if workload.trace is not None else [])]
    return ["--predictors", mode, *(gate if mode == "gate" else [])]


def run_once(workload: Workload, mode: str, args, record_trace: Path | None) -> dict:
    fanout = workload.predict_fanout
    slots = workload.cache_slots + (fanout if mode.startswith("none") else 0)  # equal arenas
    flags = ["run", "--store", str(workload.store), "--tokens", str(workload.tokens), "--cache-slots", str(slots),
             "--predict-fanout", str(fanout), "--seed", str(args.seed), "--compute-workers", str(args.compute_workers),
             "--json", *workload.flags, *mode_flags(mode, workload, args)]
    if record_trace is not None:
        flags += ["--record-trace", str(record_trace)]
    drop_page_cache()
    started = time.monotonic()
    summary = json.loads(cli(*flags, timeout_s=args.timeout_s).stdout)
    summary["process_wall_s"] = time.monotonic() - started
    return summary


def min_misses(trace: Path, cache_slots: int, timeout_s: float) -> dict:
    """Belady's MIN, LRU and the layer policy (no prefetch) on the recorded routing, `cache_slots` slots."""
    result = cli("trace", "simulate", str(trace), "--cache-slots", str(cache_slots), "--policy", "lru,layer,belady",
                 "--json", timeout_s=timeout_s)
    rows = {row["policy"]: row for row in json.loads(result.stdout)["results"]}
    return {"min_misses": rows["belady"]["misses"], "lru_misses": rows["lru"]["misses"],
            "layer_misses": rows["layer"]["misses"]}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_workload(workload: Workload, modes: list[str], args) -> dict:
    prepare(workload, args.timeout_s)
    modes = [mode for mode in modes if mode in workload.modes]
    results = {mode: ModeRuns() for mode in modes}
    trace = Path(args.workdir) / f"{workload.name}-routing.trace"
    others = [mode for mode in modes if mode not in ("none", "fused")]
    for round_index in range(args.pairs):
        shift = round_index % max(len(others), 1)
        order = ["none"] + (["fused"] if "fused" in modes else []) + others[shift:] + others[:shift]
        if round_index % 2:  # ABBA: every other round runs backwards, so steady drift cancels in the medians
            order.reverse()
        summaries = {}
        for mode in order:
            summaries[mode] = run_once(workload, mode, args, trace if (mode == "none" and round_index == 0) else None)
        baseline = summaries["none"]["sustained_tps"]
        for mode in order:
            summary = summaries[mode]
            ratio = summary["sustained_tps"] / baseline
            results[mode].runs.append(summary)
            results[mode].ratios.append(ratio)
            print(f"[{workload.name}] round {round_index + 1}/{args.pairs} {mode:>11}: "
                  f"{summary['sustained_tps']:6.2f} tok/s ({ratio:4.2f}x none), stalls {summary['demand_misses']}, "
                  f"joins {summary['prefetch_joins']}, hit rate {summary['hit_rate_pct']:5.1f}%, "
                  f"prefetches {summary['prefetches_issued']} issued / {summary['prefetches_used']} used",
                  file=sys.stderr, flush=True)
    optimum = min_misses(trace, workload.cache_slots + workload.predict_fanout, args.timeout_s)
    return {"workload": workload.name, "cache_slots": workload.cache_slots, "predict_fanout": workload.predict_fanout,
            "tokens": workload.tokens, "store": str(workload.store), **optimum,
            "modes": {mode: table_row(found) for mode, found in results.items()},
            "runs": {mode: found.runs for mode, found in results.items()}}


def table_row(found: ModeRuns) -> dict:
    runs = found.runs

    def of(key: str) -> float:
        return median([float(run[key]) for run in runs])

    row = {
        "tps": of("sustained_tps"), "ratio": median(found.ratios), "ratio_min": min(found.ratios),
        "ratio_max": max(found.ratios), "pairs": len(found.ratios), "stalls": of("demand_misses"),
        "joins": of("prefetch_joins"), "hit_rate_pct": of("hit_rate_pct"), "io_share_pct": of("io_share_pct"),
        "gb_per_token": median([run["bytes_read"] / run["tokens"] / 1e9 for run in runs]),
        "issued": of("prefetches_issued"), "used": of("prefetches_used"), "wasted": of("prefetches_wasted"),
        "dropped": of("prefetches_dropped"),
    }
    gate = runs[-1].get("predictors", {}).get("gate", {})
    if gate.get("per_layer"):
        row["gate_per_layer_topk_pct"] = {str(entry["layer"]): median(
            [next(e["topk_accuracy_pct"] for e in run["predictors"]["gate"]["per_layer"] if e["layer"] == entry["layer"])
             for run in runs]) for entry in gate["per_layer"]}
    return row


def add_gap_closed(result: dict) -> None:
    none = result["modes"]["none"]
    gap = none["stalls"] - result["min_misses"]
    for row in result["modes"].values():
        row["gap_closed"] = (none["stalls"] - row["stalls"]) / gap if gap > 0 else float("nan")


def print_table(result: dict) -> None:
    pool = result["cache_slots"] + result["predict_fanout"]
    print(f"\n=== {result['workload']}: {result['store']}, cache {result['cache_slots']} slots + "
          f"{result['predict_fanout']} (prefetch reserve; no-prefetch modes get them as cache), {result['tokens']} "
          f"tokens, {result['modes']['none']['pairs']} pairs ===")
    print(f"on the recorded routing at {pool} slots (simulated, no prefetch): MIN misses {result['min_misses']}, "
          f"LRU {result['lru_misses']}, layer policy {result['layer_misses']}")
    print(f"{'mode':<12}{'tok/s':>7}{'vs none (min-max)':>20}{'stalls':>8}{'joins':>7}{'hit %':>7}"
          f"{'I/O %':>7}{'GB/tok':>8}{'issued':>8}{'used':>6}{'wasted':>7}{'gap closed':>11}")
    for mode, row in result["modes"].items():
        print(f"{mode:<12}{row['tps']:7.2f}{row['ratio']:9.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
              f"{row['stalls']:8.0f}{row['joins']:7.0f}{row['hit_rate_pct']:7.1f}{row['io_share_pct']:7.1f}"
              f"{row['gb_per_token']:8.2f}{row['issued']:8.0f}{row['used']:6.0f}{row['wasted']:7.0f}"
              f"{row['gap_closed'] * 100:10.0f}%")
    for mode, row in result["modes"].items():
        if "gate_per_layer_topk_pct" in row:
            layers = ", ".join(f"layer {layer} {pct:.0f}%" for layer, pct in row["gate_per_layer_topk_pct"].items())
            print(f"gate top-k accuracy per target layer ({mode}): {layers}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="markov,skewed,replay", help="comma-separated: markov, skewed, replay")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated, each where the workload allows it: " + ", ".join(MODES))
    parser.add_argument("--pairs", type=int, default=5, help="rounds (each mode paired with the round's none)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per run (default 200 flat, 100 replay)")
    parser.add_argument("--governor-threshold", type=float, default=0.3, help="the fused modes' governor")
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
        args.pairs = 1
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    known = workloads(args)
    chosen = [name.strip() for name in args.workloads.split(",")]
    modes = [name.strip() for name in args.modes.split(",")]
    for name in chosen:
        if name not in known:
            parser.error(f"--workloads: unknown workload {name!r} (known: {', '.join(known)})")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r} (known: {', '.join(MODES)})")
    if "none" not in modes:
        parser.error("--modes must include none (every ratio is against it)")
    results = []
    for name in chosen:
        result = run_workload(known[name], modes, args)
        add_gap_closed(result)
        results.append(result)
        if not args.json:
            print_table(result)
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
