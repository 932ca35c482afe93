#!/usr/bin/env python3
"""mer against llama.cpp on a Mixtral-shaped model that does not fit in the memory they are given.

1. Writes a Mixtral-8x7B-shaped q4_0 GGUF with random valid weights (`tools/moe_gguf_writer.py`:
   32 blocks x 8 experts, top-2, 99 MB per expert, ~26 GB, one tensor at a time) unless the file is
   already there (a `.json` sidecar records geometry, seed, size and mtime), refusing clearly when
   the disk lacks room; converts it with `mer-pipeline convert`.
2. Runs llama.cpp (`tools/llama_runner.py`: llama-cpp-python, `--threads` 2, mmap, extra CPU
   buffer types off) and `mer-pipeline generate --ram-budget B` (each `--variants` entry, plus
   `--mer-args`) in ABBA rounds (`--pairs`: llama.cpp, the variants, the variants backwards,
   llama.cpp), each run in a fresh child memory cgroup limited to B (`tools/memory_cgroup.py`:
   v1 `memory.limit_in_bytes`, v2 `memory.max`; the process enters it before it loads anything),
   after dropping the page cache. Both engines get the same prompt (`--prompt-tokens` random plain
   token ids) and sample `--max-tokens` tokens at temperature 1 (random weights: greedy decoding
   would repeat one token and route it to the same experts every step).
3. Prints per engine decode and prefill tokens/s, their ratio to llama.cpp per round with the spread,
   GB read per decode token (each process's own `read_bytes`, summed over the cgroup's processes and
   interpolated at the decode window's ends: the disk is shared), for mer the GB per token Belady's
   MIN would read with the same cache slots on the same requests (the I/O worker's `acquire_done`
   events; `beyond_ram_report.belady_misses`), peak memory (the cgroup's
   `memory.max_usage_in_bytes` / `memory.peak`), start-up (launch to prefill), and the mer settings
   used (its resolved configuration and RAM plan). For mer also, from its log's `moe_block_done`
   events, the median dense and expert ms of a decode block (dense time at a small budget against
   in RAM: are the dense weights resident?), the hit rates of decode and prefill, and the bytes its
   processes read over its own count of decode reads (1.0: every read it causes is counted).
   `--budgets` draws the tokens/s-against-budget curve (a table per budget and a PNG when
   matplotlib is installed).
4. Refuses to report when mer's routing is concentrated: the per-layer expert usage of its decode
   passes (from its `--log-file`) must be near even (`tools/beyond_ram_report.py`).

`--quick` (~1-2 minutes here, no root needed): a 4-layer geometry (~160 MB) in a temporary directory.
mer's budget is its own fixed part (dense weights, KV cache, processes, metadata, from its RAM plan)
plus 40% of the experts (`--quick-cache-fraction`); with a cgroup (root), llama.cpp's limit is set
once its model and context are loaded to its own anonymous memory plus the same dense weights and
expert allowance, so both engines stream with the same memory for the model's data. Only the
model's files are evicted from the page cache (posix_fadvise; no root). Without a cgroup the
comparison of bytes is not fair (llama.cpp keeps the whole model in the page cache) and says so.

    python tools/bench_beyond_ram.py --budgets 12GiB --pairs 1 \\
        --variants defaults,--no-prefetch,--predictors=gate          # the docs/performance.md figures
    python tools/bench_beyond_ram.py --quick --json                   # the test's run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools run as scripts

import beyond_ram_report as report  # noqa: E402
from beyond_ram_setup import (GIB, LLAMA, BenchError, Engine, Setup, child_environment, mer_pipeline,  # noqa: E402
                              model_files, prepare)
from memory_cgroup import MemoryCgroup, cgroup_name, make_memory_cgroup  # noqa: E402
from moe_gguf_writer import describe  # noqa: E402
from page_cache import drop_page_cache, evict_files  # noqa: E402
from process_io import IoSampler, process_tree  # noqa: E402

TOOLS = Path(__file__).resolve().parent
MER_SETTING_KEYS = ("cache_slots", "prefetch", "predictors", "predict_fanout", "pipeline_depth", "cache_policy",
                    "governor_threshold", "compute_workers", "kernel_threads", "io_backend", "layered")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None,
                        help="the model file, written if missing (default: /work/stores/mixtral-8x7b-q4_0.gguf; "
                             "with --layers N: mixtral-8x7b-Nl-q4_0.gguf beside it)")
    parser.add_argument("--layers", type=int, default=None,
                        help="Mixtral's shape with N blocks instead of 32 (8: the in-RAM variant, ~6.6 GB)")
    parser.add_argument("--store", type=Path, default=None,
                        help="its converted expert store (default: the GGUF's path without .gguf, plus -gguf)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="logs, mer's cache dir and the plot (default: a directory beside the store; "
                             "--quick: a temporary directory, removed afterwards unless --keep)")
    parser.add_argument("--budgets", default="12GiB", help="comma-separated memory limits, e.g. 8GiB,12GiB,16GiB")
    parser.add_argument("--pairs", type=int, default=1, help="ABBA rounds per budget (each runs every engine twice)")
    parser.add_argument("--variants", default="defaults",
                        help="comma-separated mer variants, each 'defaults' or flags (spaces between several), "
                             "e.g. defaults,--no-prefetch,--predictors=gate")
    parser.add_argument("--mer-args", default="", help="extra flags for every mer run (one shell-quoted string)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (512: the prefill goal)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated (decode passes: one less)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompt and sampling seed")
    parser.add_argument("--timeout-s", type=float, default=None, help="seconds per run (1800; --quick 300)")
    parser.add_argument("--no-cgroup", action="store_true", help="run without memory cgroups (figures not comparable)")
    parser.add_argument("--rewrite", action="store_true", help="write and convert the model even if present")
    parser.add_argument("--quick", action="store_true", help="small geometry in a temporary directory (~1-2 min)")
    parser.add_argument("--quick-cache-fraction", type=float, default=0.4,
                        help="--quick: share of the experts the budget holds beyond mer's fixed part")
    parser.add_argument("--keep", action="store_true", help="--quick: keep the temporary directory")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curve (default: WORKDIR/beyond_ram.png)")
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.prompt_tokens < 1 or args.max_tokens < 2:
        parser.error("--pairs >= 1, --prompt-tokens >= 1 and --max-tokens >= 2 are needed")
    return args


def parse_variants(text: str, extra: str) -> list[Engine]:
    engines, common = [], shlex.split(extra)
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        flags = [] if entry == "defaults" else shlex.split(entry)
        engines.append(Engine("mer " + (entry if flags else "defaults"), [*common, *flags]))
    if not engines:
        raise BenchError(f"--variants {text!r} names no variant")
    return engines


def parse_budgets(text: str) -> list[int]:
    from mer.runtime.ram_budget import parse_size

    try:
        return [parse_size(part) for part in text.split(",") if part.strip()]
    except Exception as error:  # ConfigError with the value
        raise BenchError(f"--budgets {text!r}: {error}") from None


# --- one run ------------------------------------------------------------------------------------------

def mer_command(setup: Setup, engine: Engine, budget: int, log_file: Path, seed: int, max_tokens: int) -> list[str]:
    return [mer_pipeline(), "generate", "--model", str(setup.gguf), "--prompt-tokens", ",".join(map(str, setup.prompt)),
            "--max-tokens", str(max_tokens), "--temperature", "1", "--seed", str(seed), "--ignore-eos", "--json",
            "--log-file", str(log_file), "--ram-budget", str(budget), *engine.mer_args]


def llama_command(setup: Setup, args: argparse.Namespace, seed: int) -> list[str]:
    return [sys.executable, str(TOOLS / "llama_runner.py"), "--model", str(setup.gguf), "--prompt-tokens",
            ",".join(map(str, setup.prompt)), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
            "--seed", str(seed), "--handshake"]


def read_mer_log(log_file: Path) -> dict:
    """From mer's log: the decode window (first and last generation_token), its resolved config, its RAM plan."""
    found: dict = {"token_times": []}
    with open(log_file) as lines:
        for line in lines:
            if '"generation_token"' in line or '"run_started_supervisor"' in line or '"generation_started"' in line:
                event = json.loads(line)
                if event["event"] == "generation_token":
                    found["token_times"].append(float(event["t_mono"]))
                elif event["event"] == "run_started_supervisor":
                    found["config"] = event.get("config", {})
                elif event["event"] == "generation_started":
                    found["generation_started"] = float(event["t_mono"])
    return found


def run_once(setup: Setup, args: argparse.Namespace, engine: Engine, budget: int, tag: str, timeout_s: float) -> dict:
    """One engine, one run, in a fresh cgroup after dropping the page cache."""
    record: dict = {"engine": engine.label, "budget": budget, "ok": False}
    logs = setup.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file, stderr_file = logs / f"{tag}.jsonl", logs / f"{tag}.stderr"
    log_file.unlink(missing_ok=True)
    if args.quick:
        evict_files(model_files(setup))
    else:
        evict_files(model_files(setup))
        record["page_cache_dropped"] = drop_page_cache()
    allowance = setup.quick_allowance
    mer_budget = allowance["mer_budget"] if allowance else budget
    if engine.is_llama:
        command = llama_command(setup, args, args.seed)
        limit = None if allowance else budget  # quick: set once loaded (its own memory + the allowance)
    else:
        command = mer_command(setup, engine, mer_budget, log_file, args.seed, args.max_tokens)
        limit = mer_budget
        record["ram_budget"] = mer_budget
    group: MemoryCgroup | None = make_memory_cgroup(cgroup_name(tag), limit) if setup.cgroups else None
    prefix = group.launcher_prefix() if group else []
    with open(stderr_file, "w") as stderr:
        launched = time.monotonic()
        process = subprocess.Popen([*prefix, *command], stdout=subprocess.PIPE, stderr=stderr,
                                   stdin=subprocess.PIPE, text=True, env=child_environment(setup.workdir))
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        pids = group.pids if group else (lambda: process_tree(process.pid))
        try:
            with IoSampler(pids, interval_s=0.05 if args.quick else 0.2) as sampler:
                if engine.is_llama:
                    loaded = json.loads(process.stdout.readline() or "{}")
                    if group and allowance and loaded:
                        limit = loaded["rss_anon_bytes"] + allowance["llama_data_allowance"]
                        group.set_limit(limit)
                        group.reset_peak()  # the peak of the runs, not of the unbounded load
                    process.stdin.write("\n")
                    process.stdin.flush()
                stdout = process.stdout.read()
                process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:  # interrupted: the engine (and, in a cgroup, its children) goes too
                for pid in (group.pids() if group else process_tree(process.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait()
                if group:
                    group.remove()
    record.update(wall_s=time.monotonic() - launched, returncode=process.returncode,
                  total_gb_read=sampler.total() / report.GB, limit_bytes=limit)
    if group:
        record.update(peak_gib=(group.peak_nbytes() or 0) / GIB, oom_kills=group.oom_kills(),
                      limit_hits=group.limit_hits())
        group.remove()
    else:
        record["peak_gib"] = sampler.peak_resident / GIB  # VmRSS summed: an upper bound
    if process.returncode != 0:
        tail = stderr_file.read_text().strip().splitlines()[-3:]
        record["error"] = f"exit {process.returncode}" + (f" (OOM kills {record.get('oom_kills')})"
                                                          if record.get("oom_kills") else "") + f": {tail}"
        return record
    result = json.loads(stdout.strip().splitlines()[-1])
    if engine.is_llama:
        start, end, steps = result["t_decode"], result["t_end"], result["decode_steps"]
        prefill_window = (result["t_prefill"], result["t_decode"])
        record["startup_s"] = result["t_prefill"] - launched
    else:
        events = read_mer_log(log_file)
        times = events["token_times"]
        start, end, steps = times[0], times[-1], result["decode_steps"]
        prefill_window = (times[0] - result["prefill_s"], times[0])
        record["startup_s"] = prefill_window[0] - launched
        usage = report.routing_usage(log_file, len(setup.prompt), setup.geometry.n_experts)
        record.update(
            hit_rate_pct=result["hit_rate_pct"], mer_mib_read_per_token=result["mib_read_per_token"],
            cache_slots=result["cache_slots"], arena_bytes=result.get("arena_bytes"),
            compute_workers=result["compute_workers"], io_backend=result["io_backend"],
            prefetches_issued=result["prefetches_issued"], prefetches_used=result["prefetches_used"],
            prefetches_wasted=result["prefetches_wasted"],
            settings={key: events.get("config", {}).get(key) for key in MER_SETTING_KEYS},
            routing=report.usage_summary(usage), routing_usage={str(k): v for k, v in usage.items()},
            routing_problems=report.concentration_problems(usage), log_file=str(log_file))
        expert_bytes = setup.geometry.expert_nbytes
        misses = report.belady_misses(report.acquire_steps(log_file), result["cache_slots"], len(setup.prompt))
        record["belady_gb_per_token"] = misses * expert_bytes / report.GB / max(result["decode_steps"], 1)
        record.update(report.block_figures(log_file))
    record.update(ok=True, decode_tps=result["decode_tps"], prefill_tps=result["prefill_tps"], decode_steps=steps,
                  decode_gb_per_token=sampler.bytes_between(start, end) / report.GB / max(steps, 1),
                  prefill_gb_read=sampler.bytes_between(*prefill_window) / report.GB)
    if not engine.is_llama:  # mer's count of its decode reads against what its processes read (read_bytes)
        mer_bytes = record["mer_mib_read_per_token"] * 2**20
        record["counted_vs_mer_bytes"] = record["decode_gb_per_token"] * report.GB / mer_bytes if mer_bytes else None
    return record


# --- main ----------------------------------------------------------------------------------------------

def budget_label(budget: int) -> str:
    return f"{budget / GIB:g}GiB" if budget % (GIB // 4) == 0 else f"{budget / 2**20:.0f}MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_beyond_ram: terminated"))  # run the cleanups
    engines = [Engine(LLAMA), *parse_variants(args.variants, args.mer_args)]
    budgets = parse_budgets(args.budgets)
    timeout_s = args.timeout_s or (300.0 if args.quick else 1800.0)
    setup, timings = prepare(args, engines)
    if args.quick:
        budgets = [setup.quick_allowance["mer_budget"]]
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    for skipped in setup.skipped:
        say(f"skipped: {skipped}")
    runs: list[dict] = []
    try:
        for budget in budgets:
            for round_index in range(args.pairs):
                order = report.abba_order([engine.label for engine in engines])
                for position, label in enumerate(order):
                    engine = next(engine for engine in engines if engine.label == label)
                    tag = f"{budget_label(budget)}-r{round_index}-{position}-{label.replace(' ', '_').replace('/', '_')}"
                    record = run_once(setup, args, engine, budget, tag, timeout_s)
                    record.update(round=round_index, half=0 if position < len(engines) else 1)
                    runs.append(record)
                    (setup.workdir / "runs.json").write_text(json.dumps(runs, indent=1))  # survives a later failure
                    say(f"  {budget_label(budget)} round {round_index} {label}: " + (
                        f"decode {record['decode_tps']:.3f} tok/s, prefill {record['prefill_tps']:.2f} tok/s, "
                        f"{record['decode_gb_per_token']:.3f} GB/token, peak {record['peak_gib']:.2f} GiB"
                        if record["ok"] else f"FAILED {record['error']}"))
    finally:
        if args.quick and not args.keep and args.workdir is None:
            shutil.rmtree(setup.workdir, ignore_errors=True)
    problems = {f"{run['engine']} ({budget_label(run['budget'])}, round {run['round']})": run["routing_problems"]
                for run in runs if run.get("routing_problems")}
    if problems:
        details = "; ".join(f"{name}: {', '.join(found)}" for name, found in problems.items())
        print(f"bench_beyond_ram: refusing to report, the routing is concentrated: {details}", file=sys.stderr)
        return 3
    tables, summaries, curve = [], {}, {}
    for budget in budgets:
        rows = report.summarize([run for run in runs if run["budget"] == budget], [e.label for e in engines], LLAMA)
        summaries[budget_label(budget)] = rows
        tables.append(report.format_table(budget_label(budget), rows))
        for row in rows:
            if row["decode_tps"] is not None:
                curve.setdefault(row["engine"], []).append((budget / GIB, row["decode_tps"]))
    plot_note = "no plot with --quick"
    if not args.quick:
        plot_note = report.plot_curve(args.plot or setup.workdir / "beyond_ram.png", curve)
    fair = setup.cgroups
    quick_check = None
    if args.quick:
        mer_bytes = [run["decode_gb_per_token"] for run in runs if run["ok"] and run["engine"] != LLAMA]
        llama_bytes = [run["decode_gb_per_token"] for run in runs if run["ok"] and run["engine"] == LLAMA]
        quick_check = {"fair": fair, "mer_max_gb_per_token": max(mer_bytes, default=None),
                       "llama_min_gb_per_token": min(llama_bytes, default=None)}
    output = {"geometry": describe(setup.geometry), "gguf": str(setup.gguf), "store": str(setup.store),
              "prompt_tokens": len(setup.prompt), "max_tokens": args.max_tokens, "pairs": args.pairs,
              "engines": [asdict(engine) for engine in engines], "cgroups": setup.cgroups, "skipped": setup.skipped,
              "quick_allowance": setup.quick_allowance, "timings": timings, "runs": runs, "summary": summaries,
              "plot": plot_note, "quick_bytes_check": quick_check,
              "cgroup_prefix": cgroup_name(""), "command": " ".join(sys.argv)}
    if args.json:
        print(json.dumps(output))
        return 0 if all(run["ok"] for run in runs) else 1
    print("\n\n".join(tables))
    for run in runs:
        if run.get("settings"):
            print(f"mer settings ({run['engine']}): cache_slots {run['cache_slots']}, ram budget "
                  f"{run['ram_budget'] / GIB:.2f} GiB, {json.dumps(run['settings'])}")
            break
    print(plot_note)
    if quick_check:
        print(f"quick bytes check ({'fair: both engines stream in their cgroups' if fair else 'NOT fair: no cgroup'}): "
              f"mer at most {quick_check['mer_max_gb_per_token']} GB/token, llama.cpp at least "
              f"{quick_check['llama_min_gb_per_token']} GB/token")
    return 0 if all(run["ok"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
