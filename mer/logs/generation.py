"""A generation's summary recomputed from its raw events (`mer-pipeline generate|up --model --log-file`).

The figures and their names are those of the run's own `generation_summary`
(`mer.metrics.summary.GenerationSummary`), rebuilt from the events other processes and steps logged:

- `prefill_s`: `generation_prefill_done.t_end - t_start`; `prefill_tps` = prompt tokens / prefill_s;
- `decode_steps`: the passes after the prefill (`moe_block_done` of MoE layer 0 at a position from
  the prompt length on); `decode_s`: `generation_decode_done.t_end - t_start` (from the end of the
  prefill to the end); `decode_tps` = decode_steps / decode_s; `tokens`: the `generation_token`s;
- `hits`, `misses`, `prefetch_joins`: sums over `moe_block_done`; the prefill's blocks are those at
  a position below the prompt length, the decode steps' the others; hit rates in percent;
- `reads`, `bytes_read`: the `expert_read`s counted in the I/O worker's last statistics (`read_index`
  below `io_stats_sent.reads`); `decode_bytes_read` those of them for a position from the prompt
  length on; `mib_read_per_token` = decode_bytes_read / 2^20 / decode_steps;
- `*_us_per_block`: means over the decode steps' `moe_block_done` (dense_us, expert_us, io_wait_us
  and compute_us, the last two as `io_wait_us_per_block` and `expert_compute_us_per_block`).

A generation that did not finish (no `generation_decode_done`) is summarized from what it logged:
its decode time runs to its last `moe_block_done`, every logged read counts, and a warning says so.
The recomputed figures are checked against the logged `generation_summary` (floats within 1e-9
relative: the run sums the same numbers in another grouping); a difference is a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from mer.errors import EventLogError
from mer.logs.runs import RunLog
from mer.metrics.events import EXPERT_READ
from mer.metrics.summary import MIB

GENERATION_STARTED = "generation_started"
GENERATION_PREFILL_DONE = "generation_prefill_done"
GENERATION_DECODE_DONE = "generation_decode_done"
GENERATION_SUMMARY = "generation_summary"
GENERATION_TOKEN = "generation_token"
MOE_BLOCK_DONE = "moe_block_done"
IO_STATS_SENT = "io_stats_sent"
CHILD_READY = "child_ready"
STOP_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class GenerationLogSummary:
    """A generation's figures from its events: those of `generate --json` that a log holds, with the same
    names and units (`mer.metrics.summary.GenerationSummary`), grouped by what they tell."""

    model: str
    stop_reason: str
    # what ran: prompt tokens, generated tokens, decode passes, their MoE blocks (the per-block means' count)
    prompt_tokens: int
    tokens: int
    decode_steps: int
    moe_blocks: int
    # how fast
    prefill_s: float
    prefill_tps: float
    decode_s: float
    decode_tps: float
    # the expert cache
    hit_rate_pct: float
    prefill_hit_rate_pct: float
    decode_hit_rate_pct: float
    hits: int
    misses: int
    lookups: int
    prefetch_joins: int
    demand_misses: int
    # the disk
    reads: int
    bytes_read: int
    decode_bytes_read: int
    mib_read_per_token: float
    # where a decode MoE block's time went
    dense_us_per_block: float
    expert_us_per_block: float
    io_wait_us_per_block: float
    expert_compute_us_per_block: float
    # the graph
    cache_slots: int
    compute_workers: int | None
    io_backend: str | None

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types, `kind: "generate"` first."""
        return {"kind": "generate", **{field.name: getattr(self, field.name) for field in fields(self)}}


@dataclass
class RecomputedGeneration:
    summary: GenerationLogSummary
    logged: dict[str, Any] | None  # the run's own generation_summary event
    warnings: list[str]


def _field(event: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = event.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise EventLogError(f"{where}: field {name!r} is {value!r}, expected a {getattr(kind, '__name__', 'number')}")
    return value


def _only_start(run: RunLog) -> dict[str, Any]:
    starts = list(run.with_lines(GENERATION_STARTED))
    if not starts:
        raise EventLogError(f"{run.label}: no {GENERATION_STARTED} event: the generation never started")
    if len(starts) > 1:
        lines = ", ".join(str(line) for line, _ in starts)
        raise EventLogError(f"{run.label}: {len(starts)} generations in one run (a server's log; {GENERATION_STARTED} "
                            f"on lines {lines}): summarize reads one generation per run")
    return starts[0][1]


def _blocks(run: RunLog) -> list[dict[str, Any]]:
    """Every `moe_block_done`, its fields checked."""
    for line, event in run.with_lines(MOE_BLOCK_DONE):
        where = f"{run.path}:{line} ({MOE_BLOCK_DONE})"
        for name in ("token", "moe_layer", "hits", "misses"):
            _field(event, name, int, where)
        for name in ("dense_us", "expert_us", "io_wait_us", "compute_us"):
            _field(event, name, (int, float), where)
    return run.named(MOE_BLOCK_DONE)


def _counted_reads(run: RunLog, finished: bool) -> list[dict[str, Any]]:
    """The reads the I/O worker's last statistics counted (every logged read when the run did not finish)."""
    reads = []
    for line, event in run.with_lines(EXPERT_READ):
        where = f"{run.path}:{line} ({EXPERT_READ})"
        _field(event, "nbytes", int, where)
        _field(event, "token", int, where)
        reads.append(event)
    stats = run.last(IO_STATS_SENT)
    if finished and stats is not None and isinstance(stats.get("reads"), int):
        reads = [read for read in reads if not isinstance(read.get("read_index"), int) or read["read_index"] < stats["reads"]]
    return reads


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _child_info(run: RunLog, key: str) -> Any:
    """`key` of the first `child_ready` event that has it (the I/O worker's io_backend, the router's
    compute_workers), or None."""
    return next((event[key] for event in run.named(CHILD_READY) if key in event), None)


def _timings(run: RunLog, prompt_tokens: int, blocks: list[dict[str, Any]], warnings: list[str]) -> tuple[float, float, str, bool]:
    """(prefill_s, decode_s, stop_reason, finished)."""
    prefill = run.last(GENERATION_PREFILL_DONE)
    if prefill is None:
        raise EventLogError(f"{run.label}: no {GENERATION_PREFILL_DONE} event: the prompt never finished its pass "
                            "(or the log was written by an older mer)")
    where = f"{run.label} ({GENERATION_PREFILL_DONE})"
    t_prefill_end = _field(prefill, "t_end", (int, float), where)
    prefill_s = t_prefill_end - _field(prefill, "t_start", (int, float), where)
    decode = run.last(GENERATION_DECODE_DONE)
    if decode is not None:
        where = f"{run.label} ({GENERATION_DECODE_DONE})"
        decode_s = _field(decode, "t_end", (int, float), where) - _field(decode, "t_start", (int, float), where)
        return prefill_s, decode_s, str(decode.get("stop_reason")), True
    last = max((event["t_mono"] for event in blocks if event["token"] >= prompt_tokens), default=t_prefill_end)
    warnings.append(f"{run.label}: no {GENERATION_DECODE_DONE} event: the generation did not finish (interrupted "
                    f"or failed); it is summarized from what it logged, its decode time up to its last "
                    f"{MOE_BLOCK_DONE}")
    return prefill_s, last - t_prefill_end, STOP_INTERRUPTED, False


def _mean(values: list[float], count: int) -> float:
    return math.fsum(values) / count if count else 0.0


def summarize_generation(run: RunLog) -> RecomputedGeneration:
    """The summary of the generation in `run` from its raw events (see the module docstring)."""
    started = _only_start(run)
    where = f"{run.label} ({GENERATION_STARTED})"
    prompt_tokens = _field(started, "prompt_tokens", int, where)
    blocks = _blocks(run)
    warnings: list[str] = []
    prefill_s, decode_s, stop_reason, finished = _timings(run, prompt_tokens, blocks, warnings)
    prefill = [event for event in blocks if event["token"] < prompt_tokens]
    decode = [event for event in blocks if event["token"] >= prompt_tokens]
    steps = len({event["token"] for event in decode if event["moe_layer"] == 0})
    reads = _counted_reads(run, finished)
    decode_bytes = sum(read["nbytes"] for read in reads if read["token"] >= prompt_tokens)
    hits, misses = (sum(event[name] for event in blocks) for name in ("hits", "misses"))
    joins = sum(event.get("prefetch_joins", 0) for event in blocks)
    prefill_hits, prefill_lookups = sum(e["hits"] for e in prefill), sum(e["hits"] + e["misses"] for e in prefill)
    decode_hits, decode_lookups = sum(e["hits"] for e in decode), sum(e["hits"] + e["misses"] for e in decode)
    summary = GenerationLogSummary(
        model=str(started.get("model")), prompt_tokens=prompt_tokens, tokens=len(run.named(GENERATION_TOKEN)),
        stop_reason=stop_reason, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
        prefill_tps=prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        decode_tps=steps / decode_s if steps and decode_s > 0 else 0.0,
        hits=hits, misses=misses, lookups=hits + misses, prefetch_joins=joins, demand_misses=misses - joins,
        hit_rate_pct=_pct(hits, hits + misses), prefill_hit_rate_pct=_pct(prefill_hits, prefill_lookups),
        decode_hit_rate_pct=_pct(decode_hits, decode_lookups),
        reads=len(reads), bytes_read=sum(read["nbytes"] for read in reads), decode_bytes_read=decode_bytes,
        mib_read_per_token=decode_bytes / MIB / steps if steps else 0.0, moe_blocks=len(decode),
        **{f"{name}_per_block": _mean([event[name] for event in decode], len(decode))
           for name in ("dense_us", "expert_us", "io_wait_us")},
        expert_compute_us_per_block=_mean([event["compute_us"] for event in decode], len(decode)),
        cache_slots=started.get("cache_slots", 0), compute_workers=_child_info(run, "compute_workers"),
        io_backend=_child_info(run, "io_backend"),
    )
    logged = run.last(GENERATION_SUMMARY)
    if logged is not None:
        warnings.extend(_differences(run, summary, logged))
    return RecomputedGeneration(summary, logged, warnings)


def _differences(run: RunLog, summary: GenerationLogSummary, logged: dict[str, Any]) -> list[str]:
    """A warning naming the fields where the recomputed summary and the logged one disagree."""
    recomputed = summary.to_json_dict()
    differing = []
    for key, value in recomputed.items():
        if key in ("kind", "model") or key not in logged:
            continue
        theirs = logged[key]
        if isinstance(theirs, list):  # prompt_tokens and tokens are the ids there
            theirs = len(theirs)
        same = (math.isclose(value, theirs, rel_tol=1e-9, abs_tol=1e-9)
                if isinstance(value, float) and isinstance(theirs, (int, float)) else value == theirs)
        if not same:
            differing.append(f"{key} ({value!r} here, {theirs!r} logged)")
    if not differing:
        return []
    return [f"{run.label}: the recomputed generation summary differs from the logged {GENERATION_SUMMARY} in "
            f"{', '.join(differing)}"]


def format_generation(summary: GenerationLogSummary) -> str:
    """The generation summary as text: the timing line of `generate`, then the details."""
    s = summary
    return "\n".join([
        f"generation of {s.model}: {s.prompt_tokens} prompt tokens, {s.tokens} generated, stop: {s.stop_reason}",
        f"prefill: {s.prompt_tokens} tokens in {s.prefill_s:.3f} s = {s.prefill_tps:.1f} tok/s",
        f"decode: {s.decode_steps} steps in {s.decode_s:.3f} s = {s.decode_tps:.1f} tok/s",
        f"lookups: hits={s.hits} misses={s.misses} hit_rate={s.hit_rate_pct:.2f}% "
        f"(prefill {s.prefill_hit_rate_pct:.2f}%, decode {s.decode_hit_rate_pct:.2f}%) "
        f"joins={s.prefetch_joins} demand_misses={s.demand_misses}",
        f"i/o: reads={s.reads} bytes={s.bytes_read / MIB:.2f} MiB, decode {s.decode_bytes_read / MIB:.2f} MiB = "
        f"{s.mib_read_per_token:.3f} MiB read per token",
        f"per MoE block (mean over {s.moe_blocks} decode blocks): dense {s.dense_us_per_block:.0f} us, experts "
        f"{s.expert_us_per_block:.0f} us (I/O wait {s.io_wait_us_per_block:.0f} us, compute "
        f"{s.expert_compute_us_per_block:.0f} us)",
        f"workers: compute={s.compute_workers} io_backend={s.io_backend} cache={s.cache_slots} slots",
    ])
