"""Hand-built log events (docs/events.md) for the unit tests of `mer.logs`, with known values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN = "0a1b2c3d"
SUPERVISOR_PID = 100
PIDS = {"supervisor": SUPERVISOR_PID, "io": 101, "predictor": 102, "compute-0": 103, "compute-1": 104, "router": 105}


def envelope(name: str, t_mono: float, role: str = "router", *, run_id: str | None = RUN, level: str = "info",
             **fields: Any) -> dict[str, Any]:
    """An event as structlog writes it: the fields, then the envelope every event carries."""
    process = "mer-supervisor" if role == "supervisor" else f"mer-{role}-{run_id}"
    event = {**fields, "event": name, "schema": 1, "process": process, "pid": PIDS.get(role, 999),
             "level": level, "ts": 1.7e9 + t_mono, "t_mono": t_mono}
    if role != "supervisor" and run_id is not None:
        event["run_id"] = run_id
        event["worker"] = int(role.split("-")[1]) if role.startswith("compute-") else None
    return event


def run_started(t_mono: float = 0.5, **overrides: Any) -> dict[str, Any]:
    fields = dict(experts=16, top_k=2, cache_slots=4, pool_slots=6, d_model=256, d_ff=512, bytes_per_expert=221184,
                  dtype="q4_0", compute_workers=2, io_backend="uring")
    return envelope("run_started", t_mono, **{**fields, **overrides})


def token_done(token: int, t_start: float, cycle_us: float, io_wait_us: float, compute_us: float, hits: int,
               misses: int, prefetch_used: int = 0) -> dict[str, Any]:
    t_end = t_start + cycle_us / 1e6
    return envelope("token_done", t_end, token=token, t_start_s=t_start, t_end_s=t_end, cycle_us=cycle_us,
                    io_wait_us=io_wait_us, compute_us=compute_us, hits=hits, misses=misses,
                    lookups=hits + misses, prefetch_used=prefetch_used)


def expert_read(expert_id: int, slot: int, t_submit: float, t_done: float, kind: str = "foreground",
                token: int = 0, read_index: int = 0, queue_depth: int = 1, nbytes: int = 221184) -> dict[str, Any]:
    return envelope("expert_read", t_done, "io", expert_id=expert_id, slot=slot, nbytes=nbytes,
                    latency_us=(t_done - t_submit) * 1e6, kind=kind, token=token, t_submit=t_submit, t_done=t_done,
                    queue_depth=queue_depth, read_index=read_index)


def acquire_done(token: int, t_received: float, t_answered: float, expert_ids=(1, 2), hits: int = 2,
                 occupied: int = 2, loading: int = 0, leased: int = 2, pinned: int = 0,
                 prefetch: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)) -> dict[str, Any]:
    issued, completed, used, wasted, dropped = prefetch
    return envelope("acquire_done", t_answered, "io", token=token, request_id=token + 1, expert_ids=list(expert_ids),
                    hits=hits, misses=len(expert_ids) - hits, t_received=t_received, t_answered=t_answered,
                    occupied_slots=occupied, loading_slots=loading, leased_slots=leased, pinned_slots=pinned,
                    queue_depth=0, prefetches_issued=issued, prefetches_completed=completed, prefetches_used=used,
                    prefetches_wasted=wasted, prefetches_dropped=dropped)


def decision_done(token: int, t_acquire_start: float, t_acquire_end: float, t_compute_end: float,
                  jobs=((1, 0), (2, 1)), expert_ids=(1, 2), hits: int = 2) -> dict[str, Any]:
    return envelope("decision_done", t_compute_end, token=token, layer=0, expert_ids=list(expert_ids), hits=hits,
                    misses=len(expert_ids) - hits, t_acquire_start=t_acquire_start, t_acquire_end=t_acquire_end,
                    t_compute_end=t_compute_end, jobs=[list(job) for job in jobs])


def compute_job(worker: int, job_id: int, t_start: float, t_end: float, expert_ids=(1, 2)) -> dict[str, Any]:
    return envelope("compute_job", t_end, f"compute-{worker}", job_id=job_id, expert_ids=list(expert_ids),
                    slices=4, t_start=t_start, t_end=t_end, compute_us=(t_end - t_start) * 1e6)


def prefetch_stats(t_mono: float, issued=0, completed=0, used=0, wasted=0, dropped=0, observations=0,
                   reads_counted: int | None = None) -> dict[str, Any]:
    fields = dict(issued=issued, completed=completed, used=used, wasted=wasted, dropped=dropped,
                  predictor_observations=observations)
    if reads_counted is not None:
        fields["reads_counted"] = reads_counted
    return envelope("prefetch_stats", t_mono, **fields)


def write_log(path: Path, events: list[dict[str, Any]], *, extra_lines: dict[int, str] | None = None,
              tail: str = "") -> Path:
    """Write events as JSON lines; `extra_lines` inserts raw text at 0-based line positions; `tail` is
    appended after the last newline (a partial line when it has none)."""
    lines = [json.dumps(event) for event in events]
    for position, text in sorted((extra_lines or {}).items()):
        lines.insert(position, text)
    path.write_text("".join(line + "\n" for line in lines) + tail)
    return path
