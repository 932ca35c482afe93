#!/usr/bin/env python3
"""Load benchmark of `mer-pipeline serve`: 1, 4 and 16 concurrent streaming clients on loopback.

Starts one server (`--max-sequences` = the largest client count, a log file in a temporary
directory), then for each client count C runs C threads of the official `openai` client, each
sending `--requests` streamed completions of `--tokens` greedy tokens (`ignore_eos`, a different
prompt per client), and measures on the client side: generated tokens per second over the level's
wall time, time to first token and inter-token latency p50 / p99; from the server's `/metrics`
around the level: SSD bytes read per generated token and the mean batch size per step. Prints a
table, then the 16-vs-1 ratios of throughput and of SSD bytes per token. Bounded: loopback only,
a fixed number of requests, a timeout per request; the server is stopped with SIGTERM at the end.

    python tools/bench_serve.py --quick                       # the embedded model, cache of 8 slots
    python tools/bench_serve.py --model M.gguf --ram-budget 12GiB --tokens 32 --requests 2
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.support
from tests.support.serve_runs import ServerRun  # noqa: E402

PROMPTS = ["def ", "class ", "import ", "for i in", "return ", "if x", "while ", "print(", "self.", "x = ", "try:",
           "with open(", "from os", "lambda ", "yield ", "assert "]
REQUEST_TIMEOUT_S = 600.0


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def one_client(client: openai.OpenAI, model: str, prompt: str, tokens: int, requests: int,
               latencies: dict[str, list[float]], lock: threading.Lock) -> int:
    """Send `requests` streamed completions one after the other; the tokens received."""
    received = 0
    for _ in range(requests):
        sent = time.perf_counter()
        last = None
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            if not chunk.choices or chunk.choices[0].finish_reason and not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            with lock:
                latencies["ttft" if last is None else "itl"].append(now - (sent if last is None else last))
            last = now
            received += 1
    return received


def run_level(server: ServerRun, client: openai.OpenAI, model: str, clients: int, args) -> dict:
    latencies: dict[str, list[float]] = {"ttft": [], "itl": []}
    lock = threading.Lock()
    before = server.metrics()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_client, client, model, PROMPTS[index % len(PROMPTS)], args.tokens, args.requests,
                               latencies, lock) for index in range(clients)]
        chunks = sum(future.result() for future in futures)
    wall = time.perf_counter() - started
    time.sleep(0.3)  # the router's idle report
    after = server.metrics()
    generated = after["mer_generated_tokens_total"] - before["mer_generated_tokens_total"]
    steps = after["mer_batch_sequences_count"] - before["mer_batch_sequences_count"]
    sequences = after["mer_batch_sequences_sum"] - before["mer_batch_sequences_sum"]
    bytes_read = after["mer_ssd_bytes_read_total"] - before["mer_ssd_bytes_read_total"]
    return {"clients": clients, "requests": clients * args.requests, "generated_tokens": int(generated),
            "text_chunks": chunks, "wall_s": round(wall, 3), "tokens_per_s": round(generated / wall, 2),
            "ttft_p50_ms": round(percentile(latencies["ttft"], 0.5) * 1e3, 2),
            "ttft_p99_ms": round(percentile(latencies["ttft"], 0.99) * 1e3, 2),
            "itl_p50_ms": round(percentile(latencies["itl"], 0.5) * 1e3, 2),
            "itl_p99_ms": round(percentile(latencies["itl"], 0.99) * 1e3, 2),
            "mean_batch": round(sequences / steps, 2) if steps else 0.0,
            "ssd_bytes_per_token": round(bytes_read / generated, 1) if generated else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="MoE GGUF (default: the embedded model).")
    parser.add_argument("--clients", default="1,4,16", help="Concurrent client counts (default 1,4,16).")
    parser.add_argument("--tokens", type=int, default=64, help="Tokens per request (default 64).")
    parser.add_argument("--requests", type=int, default=4, help="Requests per client, one after the other (4).")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--ram-budget", default=None, help="Passed to serve (e.g. 12GiB).")
    memory.add_argument("--cache-slots", type=int, default=None, help="Passed to serve.")
    parser.add_argument("--compute-workers", default="auto", help="Passed to serve (default auto).")
    parser.add_argument("--kv-positions", type=int, default=None, help="Passed to serve (default: serve's).")
    parser.add_argument("--quick", action="store_true", help="The embedded model, 8 cache slots, 24 tokens x 2.")
    parser.add_argument("--json", action="store_true", help="One JSON object on stdout instead of the table.")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.requests = 24, 2
        if args.ram_budget is None and args.cache_slots is None:
            args.cache_slots = 8
    levels = [int(count) for count in args.clients.split(",")]
    flags: list[object] = ["--max-sequences", max(levels), "--max-queue", max(levels),
                           "--compute-workers", args.compute_workers]
    flags += ["--model", args.model] if args.model else []
    flags += ["--ram-budget", args.ram_budget] if args.ram_budget else []
    flags += ["--cache-slots", args.cache_slots] if args.cache_slots else []
    flags += ["--kv-positions", args.kv_positions] if args.kv_positions else []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        server = ServerRun.start(Path(workdir), *flags)
        try:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                   timeout=REQUEST_TIMEOUT_S)
            model = client.models.list().data[0].id
            one_client(client, model, PROMPTS[0], 4, 1, {"ttft": [], "itl": []}, threading.Lock())  # warm-up
            results = [run_level(server, client, model, clients, args) for clients in levels]
        finally:
            server.stop(signal.SIGTERM)
    first, last = results[0], results[-1]
    ratios = {"throughput_ratio": round(last["tokens_per_s"] / first["tokens_per_s"], 2) if first["tokens_per_s"] else 0,
              "ssd_bytes_per_token_ratio": (round(last["ssd_bytes_per_token"] / first["ssd_bytes_per_token"], 3)
                                            if first["ssd_bytes_per_token"] else None)}
    if args.json:
        print(json.dumps({"model": model, "levels": results, **ratios}))
        return 0
    print(f"model {model}: {args.requests} requests x {args.tokens} tokens per client, streamed, greedy")
    print(f"{'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'batch':>6} {'SSD B/tok':>10}")
    for level in results:
        print(f"{level['clients']:>7} {level['tokens_per_s']:>8.1f} {level['ttft_p50_ms']:>7.1f}ms "
              f"{level['ttft_p99_ms']:>6.1f}ms {level['itl_p50_ms']:>6.1f}ms {level['itl_p99_ms']:>6.1f}ms "
              f"{level['mean_batch']:>6.2f} {level['ssd_bytes_per_token']:>10.0f}")
    print(f"{last['clients']} vs {first['clients']} clients: {ratios['throughput_ratio']}x the tokens/s, "
          f"{ratios['ssd_bytes_per_token_ratio']}x the SSD bytes per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
