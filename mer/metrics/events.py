"""The events a benchmark run logs for its summary, as typed records.

Processes log these as structlog JSON events (`log.info(TOKEN_DONE, **record.to_event_fields())`);
`mer.metrics.summary` reads them back from the parsed event dicts with `from_event`, which checks every
field it needs and ignores the others (structlog adds `ts`, `process`, `pid`, `schema`, ...). The
events, their emitters and their fields with units: docs/events.md ("The benchmark job"). Times
`t_*_s` are `time.monotonic()` seconds (one clock for every process of the host); when several
`prefetch_stats` are logged, the last one counts; `predictor_stats` is informative (the summary
reads `prefetch_stats.predictors`; missing counters are 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple

from mer.errors import EventLogError
from mer.metrics.stats import percent

RUN_STARTED = "run_started"
TOKEN_DONE = "token_done"
EXPERT_READ = "expert_read"
PREFETCH_STATS = "prefetch_stats"
PREDICTOR_STATS = "predictor_stats"
RUN_SUMMARY = "run_summary"
READ_KINDS = ("foreground", "prefetch")

def _checked(value: Any, type_name: str, name: str, where: str) -> Any:
    """`value` if it is of the field's type (int, float or str; counts and times non-negative)."""
    if type_name == "str":
        if isinstance(value, str):
            return value
        raise EventLogError(f"{where}: field {name!r} must be a string, got {value!r}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "int" and not (is_number and isinstance(value, int)):
        raise EventLogError(f"{where}: field {name!r} must be an integer, got {value!r}")
    if not is_number or not math.isfinite(value):
        raise EventLogError(f"{where}: field {name!r} must be a finite number, got {value!r}")
    if value < 0:
        raise EventLogError(f"{where}: field {name!r} must not be negative, got {value!r}")
    return value


class _EventRecord:
    """Conversion between a record and the fields of its logged event."""

    def to_event_fields(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_event(cls, event: Mapping[str, Any], where: str = "event"):
        values = {}
        for field in fields(cls):  # type: ignore[arg-type]
            if field.name not in event:
                raise EventLogError(f"{where}: missing field {field.name!r}")
            values[field.name] = _checked(event[field.name], str(field.type), field.name, where)
        return cls(**values)


@dataclass(frozen=True)
class RunInfo(_EventRecord):
    """What a run is: the static fields of its summary, logged once as `run_started`."""

    experts: int
    top_k: int
    cache_slots: int
    pool_slots: int
    d_model: int
    d_ff: int
    bytes_per_expert: int
    dtype: str
    compute_workers: int
    io_backend: str


@dataclass(frozen=True)
class TokenRecord(_EventRecord):
    """One token (iteration) of the benchmark, logged as `token_done`."""

    token: int
    t_start_s: float
    t_end_s: float
    cycle_us: float
    io_wait_us: float
    compute_us: float
    hits: int
    misses: int
    lookups: int
    prefetch_used: int

    @classmethod
    def from_event(cls, event: Mapping[str, Any], where: str = "event") -> "TokenRecord":
        record = super().from_event(event, where)
        if record.hits + record.misses != record.lookups:
            raise EventLogError(
                f"{where}: token {record.token} has hits {record.hits} + misses {record.misses} "
                f"!= lookups {record.lookups}"
            )
        if record.t_end_s < record.t_start_s:
            raise EventLogError(f"{where}: token {record.token} ends (t_end_s) before it starts (t_start_s)")
        return record


@dataclass(frozen=True)
class ReadRecord(_EventRecord):
    """One read of an expert into a slot, logged as `expert_read`."""

    expert_id: int
    slot: int
    nbytes: int
    latency_us: float
    kind: str

    @classmethod
    def from_event(cls, event: Mapping[str, Any], where: str = "event") -> "ReadRecord":
        record = super().from_event(event, where)
        if record.kind not in READ_KINDS:
            raise EventLogError(f"{where}: read kind {record.kind!r} is not one of {', '.join(READ_KINDS)}")
        return record


@dataclass(frozen=True)
class PrefetchCounters(_EventRecord):
    """Cumulative prefetch and predictor counters of a run, logged as `prefetch_stats`."""

    issued: int = 0
    completed: int = 0
    used: int = 0
    wasted: int = 0
    dropped: int = 0
    predictor_observations: int = 0


class PredictorCounters(NamedTuple):
    """One predictor's prefetch counters (I/O worker) and hint accuracy counters (predictor).

    hints received, reads issued for them, completed, used before eviction, wasted (evicted unused),
    dropped by the governor, cancelled (queued reads found stale); predictions scored against the
    next decision, top-1 hits, and the observed experts found among the k best hints (`topk_found`)
    out of `topk_observed`. A record: it travels in `IoStats`.
    """

    hints: int = 0
    issued: int = 0
    completed: int = 0
    used: int = 0
    wasted: int = 0
    dropped: int = 0
    cancelled: int = 0
    predictions: int = 0
    top1_hits: int = 0
    topk_found: int = 0
    topk_observed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> "PredictorCounters":
        """The counters of `values` (missing ones are 0; others are checked and extra keys ignored)."""
        if not isinstance(values, Mapping):
            raise EventLogError(f"{where}: predictor counters must be a mapping, got {values!r}")
        checked = {name: _checked(values[name], "int", name, where) for name in cls._fields if name in values}
        return cls(**checked)

    def to_summary_dict(self) -> dict[str, Any]:
        """The counters plus top1_accuracy_pct and topk_accuracy_pct (0-100; 0.0 before any prediction)."""
        return {**self._asdict(), **_accuracies(self)}


class LayerHintCounts(NamedTuple):
    """The gate predictor's hint accuracy for one target MoE layer `ahead` decisions before it
    (`mer.predict.accuracy.LayerHintAccuracy`); a record: it travels in `PredictorStats` and `IoStats`."""

    layer: int
    ahead: int
    predictions: int
    top1_hits: int
    topk_found: int
    topk_observed: int
    hinted_found: int

    def to_summary_dict(self) -> dict[str, Any]:
        """The counters with top1/topk accuracy and hinted recall (0-100), as the run summary's `per_layer`."""
        return {**self._asdict(), **_accuracies(self),
                "hinted_recall_pct": percent(self.hinted_found, self.topk_observed)}


def _accuracies(counts: PredictorCounters | LayerHintCounts) -> dict[str, float]:
    return {"top1_accuracy_pct": percent(counts.top1_hits, counts.predictions),
            "topk_accuracy_pct": percent(counts.topk_found, counts.topk_observed)}


def predictors_from_event(event: Mapping[str, Any], where: str) -> dict[str, PredictorCounters]:
    """The `predictors` field of a `prefetch_stats` event by name ({} when absent)."""
    predictors = event.get("predictors", {})
    if not isinstance(predictors, Mapping):
        raise EventLogError(f"{where}: field 'predictors' must be a mapping of name to counters, got {predictors!r}")
    result = {}
    for name, values in predictors.items():
        if not isinstance(name, str):
            raise EventLogError(f"{where}: predictor name {name!r} is not a string")
        result[name] = PredictorCounters.from_mapping(values, f"{where} predictor {name!r}")
    return result
