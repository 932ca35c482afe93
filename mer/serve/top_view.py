"""What `mer-pipeline top` shows of a running server: one snapshot from two scrapes of `/metrics`.

Rates (generated tokens/s, steps/s, SSD MiB/s), the mean batch and the mean time to first token and
inter-token latency are over the interval between the scrapes; the hit rate is over the server's life.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _mean(before: dict[str, float], after: dict[str, float], histogram: str) -> float | None:
    count = _delta(before, after, f"{histogram}_count")
    return _delta(before, after, f"{histogram}_sum") / count if count else None


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
    }
