"""What `mer-pipeline top` shows of a running server: one snapshot from two scrapes of `/metrics`.

Rates (generated tokens/s, steps/s, SSD MiB/s, each compute worker's busy share), the mean batch and
the mean time to first token and inter-token latency are over the interval between the scrapes; the hit
rate is over the server's life; the slot map (experts in the cache per MoE layer), slots and I/O queue
are the router's last report. With `serve --cluster`, `shards`: per remote shard group its layer requests
per second and mean round trip over the interval, failovers and whether it is down.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _mean(before: dict[str, float], after: dict[str, float], histogram: str) -> float | None:
    count = _delta(before, after, f"{histogram}_count")
    return _delta(before, after, f"{histogram}_sum") / count if count else None


def _labelled(samples: dict[str, float], name: str, label: str) -> list[float]:
    """The values of `name{label=0}`, `name{label=1}`, ... in order."""
    values, index = [], 0
    while f"{name}{{{label}={index}}}" in samples:
        values.append(samples[f"{name}{{{label}={index}}}"])
        index += 1
    return values


def snapshot(before: dict[str, float], after: dict[str, float], interval_s: float) -> dict[str, Any]:
    """The view's figures (see the module docstring)."""
    hits = after.get("mer_expert_lookups_total{result=hit}", 0.0)
    misses = after.get("mer_expert_lookups_total{result=miss}", 0.0)
    steps = _delta(before, after, "mer_batch_sequences_count")
    ttft, itl = _mean(before, after, "mer_time_to_first_token_seconds"), _mean(before, after, "mer_inter_token_latency_seconds")
    return {
        "ready": bool(after.get("mer_ready", 0)),
        "interval_s": round(interval_s, 3),
        "tokens_per_s": round(_delta(before, after, "mer_generated_tokens_total") / interval_s, 2),
        "steps_per_s": round(steps / interval_s, 2),
        "mean_batch": round(_delta(before, after, "mer_batch_sequences_sum") / steps, 2) if steps else 0.0,
        "active_sequences": int(after.get("mer_active_sequences", 0)),
        "waiting_sequences": int(after.get("mer_waiting_sequences", 0)),
        "requests_in_flight": int(after.get("mer_requests_in_flight", 0)),
        "max_sequences": int(after.get("mer_max_sequences", 0)),
        "kv_positions_used": int(after.get("mer_kv_positions_used", 0)),
        "kv_positions": int(after.get("mer_kv_positions", 0)),
        "cache_slots": int(after.get("mer_cache_slots", 0)),
        "hit_rate_pct": round(100.0 * hits / (hits + misses), 2) if hits + misses else 0.0,
        "ssd_mib_per_s": round(_delta(before, after, "mer_ssd_bytes_read_total") / MIB / interval_s, 3),
        "ssd_bytes_read": int(after.get("mer_ssd_bytes_read_total", 0)),
        "generated_tokens": int(after.get("mer_generated_tokens_total", 0)),
        "mean_ttft_ms": None if ttft is None else round(ttft * 1e3, 2),
        "mean_itl_ms": None if itl is None else round(itl * 1e3, 2),
        "slots_used": int(after.get("mer_cache_slots_used", 0)),
        "slots_pinned": int(after.get("mer_cache_slots_pinned", 0)),
        "io_queue_depth": int(after.get("mer_io_queue_depth", 0)),
        "resident_experts_per_layer": [int(v) for v in _labelled(after, "mer_resident_experts", "moe_layer")],
        "worker_busy_pct": [round(100.0 * (now - then) / interval_s, 1) for now, then in zip(
            _labelled(after, "mer_compute_worker_busy_seconds_total", "worker"),
            _labelled(before, "mer_compute_worker_busy_seconds_total", "worker") or
            [0.0] * len(_labelled(after, "mer_compute_worker_busy_seconds_total", "worker")))],
        "shards": shard_rows(before, after, interval_s),
    }


def shard_rows(before: dict[str, float], after: dict[str, float], interval_s: float) -> list[dict[str, Any]]:
    """Per remote shard group (`mer_shard_*{shard}`): requests/s, mean round trip (ms), failovers, down."""
    rows = []
    for shard in range(len(_labelled(after, "mer_shard_requests_total", "shard"))):
        requests = _delta(before, after, f"mer_shard_requests_total{{shard={shard}}}")
        round_trip = _delta(before, after, f"mer_shard_round_trip_seconds_total{{shard={shard}}}")
        rows.append({"shard": shard, "requests_per_s": round(requests / interval_s, 2),
                     "mean_round_trip_ms": round(round_trip / requests * 1e3, 3) if requests else None,
                     "failovers": int(after.get(f"mer_shard_failovers_total{{shard={shard}}}", 0)),
                     "down": bool(after.get(f"mer_shard_down{{shard={shard}}}", 0))})
    return rows
