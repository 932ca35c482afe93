#!/usr/bin/env python3
"""Scale-out on one machine (loopback), and its projection for real hosts (issue #17, docs/scale-out.md).

1. Runs `mer-pipeline generate` (greedy, `--ignore-eos`, the same prompt ids, 1 compute worker per graph)
   on this machine alone and with `--cluster local:1`, `local:2` and `local:3` (one shard group per node,
   CURVE over tcp on this machine), and prints each run's decode tokens/s and whether its tokens equal
   the single machine's.
2. From each cluster run's `shard_link_summary` events: the round trip per layer per shard (send to
   answer, at the router) and the shard's own compute time within it; their difference is the
   per-layer network overhead (encode, CURVE, tcp, decode, both ways).
3. Measures this machine's CURVE link (a DEALER/ROUTER pair over tcp on 127.0.0.1 with the cluster's key
   handling): the round trip of a small message and the throughput of 1 MiB messages.
4. Projects decode tokens/s for a Mixtral-sized model on S real hosts (formula printed with its inputs):

       per token and host:  t_io  = (1 - hit(S)) * L * k * expert_bytes / S / ssd_bw
                            t_net = L * (rtt + 2 * k * d_model * 4 / link_bw)     (f32 rows, both ways)
                            hit(S) = min(1, S * cache_bytes / (L * E * expert_bytes))   (uniform routing)
       tokens/s <= 1 / (t_io + t_net + t_dense)

   with `--link-gbit`, `--link-rtt-us`, `--ssd-gbps`, `--cache-gib`, `--dense-ms` as inputs (the link
   and SSD of real hosts cannot be measured from here; the loopback figures above bound the software's
   own share).

    python tools/bench_cluster.py --quick        # 16 tokens per run (~4 minutes on a loaded 2-core machine)
    python tools/bench_cluster.py --tokens 64 --link-gbit 25 --ssd-gbps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

MIXTRAL = {"layers": 32, "experts": 8, "top_k": 2, "d_model": 4096, "expert_bytes": 99_090_432}  # q4_0
PROMPT_TOKENS = "1,72,101,108,108,111,32,119,111,114,108,100"


def mer_pipeline() -> str:
    return str(Path(sys.executable).parent / "mer-pipeline")


def generate(cluster: str | None, tokens: int, workdir: Path, model: str | None) -> dict:
    """One `generate --json` run; its result plus the shard link summaries of its log."""
    log = workdir / f"generate-{cluster or 'single'}.jsonl".replace(":", "")
    argv = [mer_pipeline(), "generate", "--prompt-tokens", PROMPT_TOKENS, "-n", str(tokens), "--ignore-eos",
            "--compute-workers", "1", "--json", "--log-file", str(log)]
    argv += ["--model", model] if model else []
    argv += ["--cluster", cluster] if cluster else []
    started = time.monotonic()
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({completed.returncode}):\n{completed.stderr}")
    result = json.loads(completed.stdout)
    result["wall_s"] = time.monotonic() - started
    result["links"] = [json.loads(line) for line in log.read_text().splitlines()
                       if '"shard_link_summary"' in line]
    return result


def measure_curve_link(seconds: float = 1.0) -> tuple[float, float]:
    """(round trip of a 64-byte message in us, throughput of 1 MiB messages in GB/s) over CURVE on loopback."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    context = zmq.Context()
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    server = context.socket(zmq.ROUTER)
    server.curve_server, server.curve_secretkey, server.curve_publickey = True, server_secret, server_public
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = context.socket(zmq.DEALER)
    client.curve_serverkey, client.curve_publickey, client.curve_secretkey = server_public, client_public, client_secret
    client.connect(f"tcp://127.0.0.1:{port}")
    try:
        def round_trip(payload: bytes) -> None:
            client.send(payload)
            identity, data = server.recv_multipart()
            server.send_multipart([identity, data])
            client.recv()

        round_trip(b"x")
        small, count, deadline = b"x" * 64, 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            round_trip(small)
            count += 1
        rtt_us = (time.perf_counter() - started) / count * 1e6
        big, moved, deadline = os.urandom(1 << 20), 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            round_trip(big)
            moved += 2 * len(big)
        return rtt_us, moved / (time.perf_counter() - started) / 1e9
    finally:
        client.close(0)
        server.close(0)
        auth.stop()
        context.term()


def link_overhead(links: list[dict]) -> tuple[float, float, float]:
    """(mean round trip per layer per shard, mean shard compute in it, their difference), microseconds."""
    requests = sum(link["requests"] for link in links)
    round_trip = sum(link["round_trip_us_total"] for link in links) / requests
    compute = sum(link["shard_compute_us_total"] for link in links) / requests
    return round_trip, compute, round_trip - compute


def projection(args: argparse.Namespace) -> list[tuple[int, float, float, float, float]]:
    """(hosts, hit rate, t_io ms, t_net ms, tokens/s) per host count, by the module docstring's formula."""
    layers, experts, k, d_model, expert_bytes = (MIXTRAL[key] for key in
                                                 ("layers", "experts", "top_k", "d_model", "expert_bytes"))
    total = layers * experts * expert_bytes
    rows = []
    for hosts in (1, 2, 3, 4):
        hit = min(1.0, hosts * args.cache_gib * 2**30 / total)
        t_io = (1 - hit) * layers * k * expert_bytes / hosts / (args.ssd_gbps * 1e9)
        link_bytes_per_s = args.link_gbit * 1e9 / 8
        t_net = 0.0 if hosts == 1 else layers * (args.link_rtt_us * 1e-6 + 2 * k * d_model * 4 / link_bytes_per_s)
        rows.append((hosts, hit, t_io * 1e3, t_net * 1e3, 1 / (t_io + t_net + args.dense_ms * 1e-3)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 tokens per run")
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per run (default 48)")
    parser.add_argument("--model", default=None, help="the GGUF (default: the tiny model shipped with mer)")
    parser.add_argument("--link-gbit", type=float, default=10.0, help="the hosts' link, Gbit/s (default 10)")
    parser.add_argument("--link-rtt-us", type=float, default=100.0,
                        help="a layer's request/answer latency between hosts beyond the bytes, us (default 100)")
    parser.add_argument("--ssd-gbps", type=float, default=3.0, help="each host's SSD read bandwidth, GB/s (default 3)")
    parser.add_argument("--cache-gib", type=float, default=12.0, help="each host's RAM for experts, GiB (default 12)")
    parser.add_argument("--dense-ms", type=float, default=40.0,
                        help="the router's dense part per token, ms (default 40)")
    args = parser.parse_args()
    tokens = 16 if args.quick else args.tokens

    results = {}
    with tempfile.TemporaryDirectory(prefix="mer-bench-cluster-") as workdir:
        for cluster in (None, "local:1", "local:2", "local:3"):
            print(f"running generate {'--cluster ' + cluster if cluster else '(one machine)'} ...", file=sys.stderr)
            results[cluster] = generate(cluster, tokens, Path(workdir), args.model)
    single = results[None]
    print(f"\ngenerate, {tokens} greedy tokens, 1 compute worker per graph, loopback (this machine, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}):")
    print(f"{'run':<16}{'decode tok/s':>14}{'tokens equal':>14}{'rtt/layer/shard':>18}{'shard compute':>15}"
          f"{'network':>10}")
    for cluster, result in results.items():
        equal = str(result["tokens"] == single["tokens"])
        line = f"{cluster or 'one machine':<16}{result['decode_tps']:>14.1f}{equal:>14}"
        if result["links"]:
            round_trip, compute, network = link_overhead(result["links"])
            line += f"{round_trip / 1e3:>15.2f} ms{compute / 1e3:>12.2f} ms{network / 1e3:>7.2f} ms"
        print(line)

    rtt_us, gbps = measure_curve_link()
    print(f"\nCURVE over tcp on 127.0.0.1: round trip {rtt_us:.0f} us (64 B), throughput {gbps:.2f} GB/s "
          f"(1 MiB messages, both ways)")

    print(f"\nprojection, Mixtral-sized q4_0 ({MIXTRAL['layers']} layers x {MIXTRAL['experts']} experts, top-"
          f"{MIXTRAL['top_k']}, {MIXTRAL['expert_bytes'] / 1e6:.1f} MB per expert), f32 rows on the wire:")
    print(f"  inputs: link {args.link_gbit:g} Gbit/s, {args.link_rtt_us:g} us per layer round trip, SSD "
          f"{args.ssd_gbps:g} GB/s per host, {args.cache_gib:g} GiB of expert cache per host, dense {args.dense_ms:g} "
          f"ms per token")
    print("  t_io = (1 - hit) * L * k * expert_bytes / S / ssd_bw;  t_net = L * (rtt + 2 * k * d_model * 4 / link_bw);"
          "  hit = min(1, S * cache / all experts)")
    print(f"  {'hosts':>5}{'hit':>8}{'t_io ms':>10}{'t_net ms':>10}{'tok/s':>9}")
    for hosts, hit, t_io, t_net, tps in projection(args):
        print(f"  {hosts:>5}{hit:>8.2f}{t_io:>10.1f}{t_net:>10.2f}{tps:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
