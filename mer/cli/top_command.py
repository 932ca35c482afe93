"""`mer-pipeline top`: a live view of a running `mer-pipeline serve` from its `/metrics` (rich).

`--once` prints one snapshot (two scrapes `--interval` apart) and exits; with `--json` as one JSON
object (`mer.serve.top_view.snapshot`'s keys).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error

from rich.console import Console
from rich.live import Live
from rich.table import Table

from mer.cli.flag_types import positive_number
from mer.errors import ConfigError
from mer.serve.probe import scrape
from mer.serve.top_view import snapshot


def register(subparsers) -> None:
    parser = subparsers.add_parser("top", help="live view of a running mer-pipeline serve",
                                   description="Show a running server's figures (tokens/s, batch, sequences, hit "
                                               "rate, SSD reads, latencies) from its /metrics, refreshed live.")
    parser.add_argument("--url", default="http://127.0.0.1:8080", metavar="URL",
                        help="The server (default http://127.0.0.1:8080).")
    parser.add_argument("--interval", type=positive_number, default=1.0, metavar="SECONDS",
                        help="Seconds between scrapes; rates are over this interval (default 1).")
    parser.add_argument("--once", action="store_true", help="Print one snapshot and exit.")
    parser.add_argument("--json", action="store_true", help="With --once: one JSON object on stdout.")
    parser.set_defaults(handler=run)


def _scrape(url: str) -> dict[str, float]:
    try:
        return scrape(url)
    except (urllib.error.URLError, OSError) as error:
        raise ConfigError(f"--url {url}: cannot read {url.rstrip('/')}/metrics: {getattr(error, 'reason', error)}") from None


def next_snapshot(url: str, before: dict[str, float], interval_s: float) -> tuple[dict, dict[str, float]]:
    started = time.monotonic()
    time.sleep(interval_s)
    after = _scrape(url)
    return snapshot(before, after, time.monotonic() - started), after


def slot_map(resident: list[int]) -> str:
    """One block per MoE layer, its shade by how many of the cache's experts it holds (the largest: full)."""
    shades = " ░▒▓█"
    most = max(resident, default=0) or 1
    return "".join(shades[round(count / most * (len(shades) - 1))] for count in resident) + \
        f"  ({', '.join(map(str, resident))})"


def table(url: str, view: dict) -> Table:
    grid = Table(title=f"mer serve at {url}" + ("" if view["ready"] else " (loading)"), show_header=False)
    rows = [("generated tokens/s", f"{view['tokens_per_s']:.1f}"),
            ("steps/s, mean batch", f"{view['steps_per_s']:.1f}, {view['mean_batch']:.2f}"),
            ("sequences active / waiting / max", f"{view['active_sequences']} / {view['waiting_sequences']} / "
                                                 f"{view['max_sequences']}"),
            ("requests in flight", str(view["requests_in_flight"])),
            ("KV positions", f"{view['kv_positions_used']} / {view['kv_positions']}"),
            ("expert hit rate", f"{view['hit_rate_pct']:.1f}% ({view['cache_slots']} slots)"),
            ("SSD reads, I/O queue", f"{view['ssd_mib_per_s']:.2f} MiB/s, {view['io_queue_depth']} reads"),
            ("slots used / pinned", f"{view['slots_used']} / {view['slots_pinned']} of {view['cache_slots']}"),
            ("slot map (experts per MoE layer)", slot_map(view["resident_experts_per_layer"])),
            ("compute workers busy", "  ".join(f"{pct:.0f}%" for pct in view["worker_busy_pct"]) or "-"),
            ("mean TTFT / ITL", f"{view['mean_ttft_ms'] or 0:.1f} ms / {view['mean_itl_ms'] or 0:.1f} ms")]
    for shard in view["shards"]:
        round_trip = shard["mean_round_trip_ms"]
        rows.append((f"shard {shard['shard']}" + (" (DOWN)" if shard["down"] else ""),
                     f"{shard['requests_per_s']:.1f} layer requests/s, round trip "
                     f"{'-' if round_trip is None else f'{round_trip:.2f} ms'}, {shard['failovers']} failovers"))
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def run(args: argparse.Namespace) -> int:
    before = _scrape(args.url)
    if args.once:
        view, _ = next_snapshot(args.url, before, args.interval)
        if args.json:
            print(json.dumps(view))
        else:
            Console().print(table(args.url, view))
        return 0
    with Live(table(args.url, snapshot(before, before, 1.0)), refresh_per_second=4) as live:
        while True:
            view, before = next_snapshot(args.url, before, args.interval)
            live.update(table(args.url, view))
