"""The run summary: every field of the seed benchmark's summary, computed from the logged events.

`summarize_log_events(events)` computes it from a log's events (the `run_started` event as the
run's info, the reads from the `expert_read` events); in the run, `summarize_log_events(events,
reads)` takes the reads from the I/O worker's `IoStats` (`ReadFigures.of_stats`) instead, which
counts every read it logs into the same `LatencyHistogram`, so a log tool recomputes a run's
`run_summary` exactly. Definitions:

- `wall_s`: from the first token's start to the last token's end, `max(t_end_s) - min(t_start_s)`
  over the `token_done` events (gaps between tokens included);
- `sustained_tps` = tokens / wall_s; `avg_throughput_mibps` = bytes_read / 2^20 / wall_s;
- `hits`, `misses`: sums over `token_done`; `hit_rate_pct` = hits / (hits + misses) x 100;
  `prefetch_joins`: misses that joined a prefetch read already in flight (`token_done.prefetch_used`);
  `demand_misses` = misses - prefetch_joins, the stalls: lookups whose read the foreground itself
  had to start (the simulator's `stalls`);
- `reads`, `bytes_read`: count and byte sum of every `expert_read` (foreground and prefetch; the
  seed printed demand reads only beside bytes of all reads); `io_latency_us`: percentiles of their
  latency_us from the `LatencyHistogram` (`mer.metrics.stats`: within 1%, exact at the extremes);
- `compute_us`, `cycle_us`: percentiles over the tokens' compute_us and cycle_us (plus max);
- `io_wait_us_per_token`, `compute_us_per_token`: means over ALL tokens (a token with no miss
  counts with io_wait 0, as in the seed's "over N tokens");
- `io_share_pct` = sum(io_wait_us) / sum(cycle_us) x 100;
- prefetch counters and predictor observations: the last `prefetch_stats` event (0 when none);
- `predictors`: the `predictors` field of that event ({} when absent, e.g. with --no-prefetch): each
  predictor's counters with top1/topk accuracy (docs/events.md, `predictor_stats`), plus the gate's
  `per_layer` accuracies (`mer.predict.accuracy`) when it has them.

Other percentiles are nearest-rank on exact values (`mer.metrics.stats`); sums of floats use math.fsum, so
the result does not depend on the order of events. Percentages are 0-100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field, fields
from typing import Any, Iterable, Mapping

from mer.errors import EventLogError
from mer.logging_setup import LOG_SCHEMA_VERSION
from mer.metrics.events import (EXPERT_READ, PREFETCH_STATS, RUN_STARTED, TOKEN_DONE, PredictorCounters, PrefetchCounters,
                            ReadRecord, RunInfo, TokenRecord, predictors_from_event)
from mer.metrics.stats import LatencyHistogram, Percentiles

MIB = 2**20
_LATENCY_GROUPS = ("io_latency_us", "compute_us", "cycle_us")  # nested {p50, p95, p99}; cycle_us adds max
_OPTIONAL_FIELDS = ("prefetch_joins", "demand_misses", "predictors")  # absent from summaries of older logs


@dataclass(frozen=True)
class RunSummary:
    """A benchmark run's summary; `to_json_dict()` gives the `run --json` / `run_summary` keys."""

    wall_s: float
    tokens: int
    sustained_tps: float
    avg_throughput_mibps: float
    hit_rate_pct: float
    experts: int
    top_k: int
    cache_slots: int
    pool_slots: int
    d_model: int
    d_ff: int
    bytes_per_expert: int
    dtype: str
    hits: int
    misses: int
    prefetches_issued: int
    prefetches_completed: int
    prefetches_used: int
    prefetches_wasted: int
    prefetches_dropped: int
    predictor_observations: int
    reads: int
    bytes_read: int
    io_latency_us: Percentiles
    compute_us: Percentiles
    cycle_us: Percentiles
    io_wait_us_per_token: float
    compute_us_per_token: float
    io_share_pct: float
    compute_workers: int
    io_backend: str
    lookups: int
    prefetch_joins: int = 0
    demand_misses: int = 0
    predictors: dict[str, dict[str, Any]] = dataclass_field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types; latency groups nested ({p50, p95, p99}, cycle_us with max)."""
        data: dict[str, Any] = {field.name: getattr(self, field.name) for field in fields(self)}
        data.update({name: data[name].to_json_dict() for name in _LATENCY_GROUPS})  # keys keep their place
        data["predictors"] = {name: dict(counters) for name, counters in self.predictors.items()}
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "RunSummary":
        """The summary of a `to_json_dict()` result (e.g. a logged `run_summary` event)."""
        try:
            values = {field.name: data[field.name] for field in fields(cls) if field.name not in _OPTIONAL_FIELDS}
            values.update({name: int(data.get(name, 0)) for name in _OPTIONAL_FIELDS if name != "predictors"})
            values["predictors"] = {name: dict(counters) for name, counters in data.get("predictors", {}).items()}
            for name in _LATENCY_GROUPS:
                values[name] = Percentiles.from_json_dict(values[name])
        except (KeyError, TypeError) as error:
            raise EventLogError(f"run summary: missing or malformed field {error}") from error
        return cls(**values)


@dataclass(frozen=True)
class GenerationSummary:
    """A generation job's summary (`generate --json`, the `generation_summary` event).

    The lookup, read, prefetch and predictor figures have the names and meanings of `RunSummary`'s
    (hits + prefetch_joins + demand_misses = lookups); `decode_bytes_read` counts the reads started
    for the decode steps' positions, `mib_read_per_token` is that per decode step; the `*_per_block`
    costs are means over the decode steps' MoE blocks (`mer.model.forward.ForwardCosts`)."""

    prompt_tokens: list[int]
    tokens: list[int]
    stop_reason: str
    prefill_s: float
    decode_s: float
    decode_steps: int
    prefill_tps: float
    decode_tps: float
    hits: int
    misses: int
    lookups: int
    prefetch_joins: int
    demand_misses: int
    hit_rate_pct: float
    prefill_hit_rate_pct: float  # the prompt's lookups alone (mostly misses on a cold cache)
    decode_hit_rate_pct: float  # the decode steps' lookups alone
    reads: int
    bytes_read: int
    decode_bytes_read: int
    mib_read_per_token: float
    prefetches_issued: int
    prefetches_used: int
    prefetches_wasted: int
    predictor_observations: int
    predictors: dict[str, dict[str, Any]]
    dense_us_per_block: float
    expert_us_per_block: float
    io_wait_us_per_block: float
    expert_compute_us_per_block: float
    other_us_per_token: float
    cache_slots: int
    compute_workers: int
    io_backend: str

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types, `kind: "generate"` first."""
        return {"kind": "generate", **{field.name: getattr(self, field.name) for field in fields(self)}}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "GenerationSummary":
        missing = sorted({field.name for field in fields(cls)} - set(data))
        if missing:
            raise EventLogError(f"generation summary: missing fields {missing}")
        return cls(**{field.name: data[field.name] for field in fields(cls)})


@dataclass(frozen=True)
class PerplexitySummary:
    """A perplexity job's summary (`perplexity --json`, the `perplexity_summary` event; the rules:
    `mer.model.perplexity`). `ppl` ± `ppl_error` is the final value (the error None where it is
    undefined), `nll` the mean negative log-likelihood of the `scored_tokens`; per chunk (in order)
    `chunk_ppl` is the chunk's own value and `running_ppl` the value over the chunks up to it. The
    lookup and read figures have `RunSummary`'s meanings; `tokens_per_s` counts every token run."""

    context: int
    chunks: int
    text_tokens: int
    scored_tokens: int
    ppl: float
    ppl_error: float | None
    nll: float
    chunk_ppl: list[float]
    running_ppl: list[float]
    seconds: float
    tokens_per_s: float
    hits: int
    misses: int
    hit_rate_pct: float
    reads: int
    bytes_read: int
    cache_slots: int
    compute_workers: int
    io_backend: str

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types, `kind: "perplexity"` first."""
        return {"kind": "perplexity", **{field.name: getattr(self, field.name) for field in fields(self)}}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "PerplexitySummary":
        missing = sorted({field.name for field in fields(cls)} - set(data))
        if missing:
            raise EventLogError(f"perplexity summary: missing fields {missing}")
        return cls(**{field.name: data[field.name] for field in fields(cls)})


@dataclass(frozen=True)
class ShardSummary:
    """A shard group's summary (`shard-serve --json`, the `shard_group_summary` event): the shard, the
    experts it served, the `ShardLayerRequest`s answered with outputs (`requests`, their `rows` and
    expert batches `expert_batches`), those answered with an error (`errors`), and the expert lookups
    (`hits`, `misses`) and compute microseconds of the answered ones; `seconds` it served for."""

    shard: int
    endpoint: str
    experts_served: int
    requests: int
    rows: int
    expert_batches: int
    errors: int
    hits: int
    misses: int
    compute_us: float
    seconds: float
    compute_workers: int

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types, `kind: "shard"` first."""
        return {"kind": "shard", **{field.name: getattr(self, field.name) for field in fields(self)}}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "ShardSummary":
        missing = sorted({field.name for field in fields(cls)} - set(data))
        if missing:
            raise EventLogError(f"shard summary: missing fields {missing}")
        return cls(**{field.name: data[field.name] for field in fields(cls)})


JobSummary = RunSummary | GenerationSummary | PerplexitySummary | ShardSummary


@dataclass(frozen=True)
class ReadFigures:
    """The reads of a run: how many, their bytes and their latency histogram."""

    reads: int
    bytes_read: int
    latency: LatencyHistogram

    @classmethod
    def of_records(cls, records: list[ReadRecord]) -> "ReadFigures":
        return cls(len(records), sum(r.nbytes for r in records), LatencyHistogram.of(r.latency_us for r in records))

    @classmethod
    def of_stats(cls, stats) -> "ReadFigures":
        """The reads counted in an `IoStats` message."""
        return cls(stats.reads.reads, stats.reads.nbytes, stats.read_latency_us)


@dataclass
class CollectedEvents:
    """The records of a run, gathered from its event dicts."""

    tokens: list[TokenRecord]
    reads: ReadFigures
    prefetch: PrefetchCounters
    run_infos: list[RunInfo]
    predictors: dict[str, PredictorCounters] = dataclass_field(default_factory=dict)
    per_layer: dict[str, list] = dataclass_field(default_factory=dict)  # the gate's per-target-layer accuracy


def collect_events(events: Iterable[Mapping[str, Any]]) -> CollectedEvents:
    """Gather the summary's records from event dicts (others are ignored), checking every field.

    A prefetch read can finish after the router took the I/O worker's final statistics, so a log may
    hold `expert_read` events the run's summary did not count: when `prefetch_stats` carries
    `reads_counted`, only the reads whose `read_index` is below it count.
    """
    collected = CollectedEvents([], ReadFigures.of_records([]), PrefetchCounters(), [])
    reads: list[ReadRecord] = []
    seen_tokens: set[int] = set()
    read_indices: list[int | None] = []
    reads_counted: int | None = None
    for index, event in enumerate(events):
        name = event.get("event") if isinstance(event, Mapping) else None
        where = f"event {index} ({name})"
        if name not in (TOKEN_DONE, EXPERT_READ, PREFETCH_STATS, RUN_STARTED):
            continue
        if "schema" in event and event["schema"] != LOG_SCHEMA_VERSION:
            raise EventLogError(
                f"{where}: log schema {event['schema']!r}, this mer reads schema {LOG_SCHEMA_VERSION}"
            )
        if name == TOKEN_DONE:
            record = TokenRecord.from_event(event, where)
            if record.token in seen_tokens:
                raise EventLogError(f"{where}: token {record.token} is logged twice")
            seen_tokens.add(record.token)
            collected.tokens.append(record)
        elif name == EXPERT_READ:
            reads.append(ReadRecord.from_event(event, where))
            read_indices.append(event.get("read_index"))
        elif name == PREFETCH_STATS:
            collected.prefetch = PrefetchCounters.from_event(event, where)
            reads_counted = event.get("reads_counted")
            collected.predictors = predictors_from_event(event, where)
            collected.per_layer = {name: list(values["per_layer"])
                                   for name, values in dict(event.get("predictors") or {}).items()
                                   if isinstance(values, Mapping) and isinstance(values.get("per_layer"), list)}
        else:
            collected.run_infos.append(RunInfo.from_event(event, where))
    if isinstance(reads_counted, int):
        reads = [read for read, index in zip(reads, read_indices) if not isinstance(index, int) or index < reads_counted]
    collected.reads = ReadFigures.of_records(reads)
    return collected


def summarize(events: Iterable[Mapping[str, Any]], info: RunInfo) -> RunSummary:
    """The run summary of a run's events (token_done, expert_read, prefetch_stats) and its static info."""
    return _summarize_collected(collect_events(events), info)


def summarize_log_events(events: Iterable[Mapping[str, Any]], reads: ReadFigures | None = None) -> RunSummary:
    """The run summary from a log's parsed events; the static info comes from `run_started`, the reads
    from `expert_read` events unless `reads` gives them (the run: from the I/O worker's `IoStats`)."""
    collected = collect_events(events)
    if reads is not None:
        collected.reads = reads
    if not collected.run_infos:
        raise EventLogError(f"no {RUN_STARTED} event: the log does not hold the start of a run")
    if len(collected.run_infos) > 1:
        raise EventLogError(
            f"the log holds {len(collected.run_infos)} runs ({RUN_STARTED} events); summarize one run at a time"
        )
    return _summarize_collected(collected, collected.run_infos[0])


def _summarize_collected(collected: CollectedEvents, info: RunInfo) -> RunSummary:
    tokens, reads, prefetch = collected.tokens, collected.reads, collected.prefetch
    if not tokens:
        raise EventLogError(f"no {TOKEN_DONE} events: the run finished no token")
    wall_s = max(t.t_end_s for t in tokens) - min(t.t_start_s for t in tokens)
    if wall_s <= 0:
        raise EventLogError(f"wall time {wall_s} s is not positive (t_start_s / t_end_s of the tokens)")
    hits = sum(t.hits for t in tokens)
    misses = sum(t.misses for t in tokens)
    joins = sum(t.prefetch_used for t in tokens)
    lookups = hits + misses
    bytes_read = reads.bytes_read
    io_wait_sum = math.fsum(t.io_wait_us for t in tokens)
    cycle_sum = math.fsum(t.cycle_us for t in tokens)
    return RunSummary(
        wall_s=wall_s,
        tokens=len(tokens),
        sustained_tps=len(tokens) / wall_s,
        avg_throughput_mibps=bytes_read / MIB / wall_s,
        hit_rate_pct=hits / lookups * 100 if lookups else 0.0,
        **info.to_event_fields(),  # experts .. dtype, compute_workers, io_backend
        hits=hits,
        misses=misses,
        prefetches_issued=prefetch.issued,
        prefetches_completed=prefetch.completed,
        prefetches_used=prefetch.used,
        prefetches_wasted=prefetch.wasted,
        prefetches_dropped=prefetch.dropped,
        predictor_observations=prefetch.predictor_observations,
        reads=reads.reads,
        bytes_read=bytes_read,
        io_latency_us=reads.latency.percentiles(),
        compute_us=Percentiles.of((t.compute_us for t in tokens), with_max=False),
        cycle_us=Percentiles.of(t.cycle_us for t in tokens),
        io_wait_us_per_token=io_wait_sum / len(tokens),
        compute_us_per_token=math.fsum(t.compute_us for t in tokens) / len(tokens),
        io_share_pct=io_wait_sum / cycle_sum * 100 if cycle_sum else 0.0,
        lookups=lookups,
        prefetch_joins=joins,
        demand_misses=misses - joins,
        predictors={name: _predictor_entry(collected.predictors[name], collected.per_layer.get(name))
                    for name in sorted(collected.predictors)},
    )


def predictor_summaries(reports) -> dict[str, dict[str, Any]]:
    """The summary's `predictors` from an `IoStats`' `PredictorReport`s: each one's counters with its
    accuracies, plus the gate's `per_layer` accuracies when it reported some."""
    return {report.name: _predictor_entry(report.counters, [layer.to_summary_dict() for layer in report.per_layer]
                                          if report.per_layer else None)
            for report in sorted(reports, key=lambda report: report.name)}


def _predictor_entry(counters: PredictorCounters, per_layer: list | None) -> dict[str, Any]:
    """A predictor's counters with its accuracies, plus the gate's `per_layer` accuracies when given."""
    return {**counters.to_summary_dict(), **({} if per_layer is None else {"per_layer": per_layer})}


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}us"


def format_seed_block(summary: RunSummary) -> str:
    """The summary as the seed printed it (same lines and names), plus prefetch and worker details."""
    s = summary
    io, compute, cycle = s.io_latency_us, s.compute_us, s.cycle_us
    lines = [
        f"stream complete wall_s={s.wall_s!r} sustained_tps={s.sustained_tps!r} "
        f"avg_throughput_mibps={s.avg_throughput_mibps!r} hit_rate_pct={s.hit_rate_pct!r}",
        f"experts: {s.experts} (top-{s.top_k}), cache={s.cache_slots} slots, pool={s.pool_slots} slots",
        f"ffn shape: d_model={s.d_model} d_ff={s.d_ff} bytes/expert={s.bytes_per_expert} (dtype={s.dtype})",
        f"lookups: hits={s.hits} misses={s.misses} hit_rate={s.hit_rate_pct:.2f}%",
        f"prefetches: issued={s.prefetches_issued} completed={s.prefetches_completed} "
        f"used={s.prefetches_used} wasted={s.prefetches_wasted} dropped={s.prefetches_dropped} "
        f"predictor_observations={s.predictor_observations} joins={s.prefetch_joins} "
        f"demand_misses={s.demand_misses}",
        f"i/o: reads={s.reads} bytes={s.bytes_read / MIB:.2f} MiB",
        f"i/o latency: p50={_us(io.p50)} p95={_us(io.p95)} p99={_us(io.p99)}",
        f"compute: p50={_us(compute.p50)} p95={_us(compute.p95)} p99={_us(compute.p99)} (SwiGLU FFN per token)",
        f"cycle latency: p50={_us(cycle.p50)} p95={_us(cycle.p95)} p99={_us(cycle.p99)} max={_us(cycle.max)}",
        f"per-token avg: io_wait={s.io_wait_us_per_token:.1f}us compute={s.compute_us_per_token:.1f}us "
        f"(over {s.tokens} tokens)",
        f"I/O share: {s.io_share_pct:.2f}% of token cycle time spent waiting on SSD reads",
        f"workers: compute={s.compute_workers} io_backend={s.io_backend}",
    ]
    for name, p in s.predictors.items():
        lines.append(
            f"predictor {name}: hints={p['hints']} issued={p['issued']} completed={p['completed']} "
            f"used={p['used']} wasted={p['wasted']} dropped={p['dropped']} "
            f"top1={p['top1_accuracy_pct']:.1f}% topk={p['topk_accuracy_pct']:.1f}% "
            f"(over {p['predictions']} predictions)"
        )
    return "\n".join(lines)
