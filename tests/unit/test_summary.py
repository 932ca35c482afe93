"""Run summaries: percentiles, every summary field from hand-built events, JSON round trips, errors,
and the seed's printed block reproduced from events built to match the seed's published figures."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from mer.errors import EventLogError
from mer.metrics.events import PrefetchCounters, ReadRecord, RunInfo, TokenRecord
from mer.metrics.stats import LATENCY_RESOLUTION, LatencyHistogram, Percentiles, nearest_rank
from mer.protocol import IoStats, PrefetchCounts, ReadCounts, decode, encode
from mer.metrics.events import ReadRecord
from mer.metrics.summary import ReadFigures, RunSummary, format_seed_block, summarize, summarize_log_events
from tests.support.exact_stats import mean, percentile

SEED_BLOCK = """\
stream complete wall_s=233.828879846 sustained_tps=21.383158501605987 avg_throughput_mibps=103.46455072587074 hit_rate_pct=97.46000000000001
experts: 256 (top-2), cache=256 slots, pool=258 slots
ffn shape: d_model=4096 d_ff=14336 bytes/expert=99090432 (dtype=q4_0)
lookups: hits=9746 misses=254 hit_rate=97.46%
prefetches: completed=2 predictor_observations=19996
i/o: reads=254 bytes=24193.00 MiB
i/o latency: p50=116543us p95=233599us p99=360191us
compute: p50=40255us p95=41631us p99=60735us (SwiGLU FFN per token)
cycle latency: p50=40287us p95=42047us p99=286975us max=431615us
per-token avg: io_wait=5772.7us compute=40850.5us (over 5000 tokens)
I/O share: 12.37% of token cycle time spent waiting on SSD reads""".splitlines()

JSON_KEYS = [
    "wall_s", "tokens", "sustained_tps", "avg_throughput_mibps", "hit_rate_pct", "experts", "top_k",
    "cache_slots", "pool_slots", "d_model", "d_ff", "bytes_per_expert", "dtype", "hits", "misses",
    "prefetches_issued", "prefetches_completed", "prefetches_used", "prefetches_wasted", "prefetches_dropped",
    "predictor_observations", "reads", "bytes_read", "io_latency_us", "compute_us", "cycle_us",
    "io_wait_us_per_token", "compute_us_per_token", "io_share_pct", "compute_workers", "io_backend",
]
READ_NBYTES = 99_090_432 + 4096  # a Mixtral q4_0 payload plus its header page


# --- percentiles -------------------------------------------------------------------------------

def test_nearest_rank_on_known_lists():
    hundred = list(range(1, 101))
    assert [percentile(hundred, p) for p in (0, 1, 50, 95, 99, 100)] == [1, 1, 50, 95, 99, 100]
    four = [40, 10, 30, 20]
    assert [percentile(four, p) for p in (25, 26, 50, 51, 75, 95, 99)] == [10, 20, 20, 30, 30, 40, 40]
    twenty = list(range(20))
    assert percentile(twenty, 95) == 18  # rank ceil(0.95 x 20) = 19 exactly, no float round-up to 20
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        nearest_rank([1, 2], 101)


def test_percentiles_are_values_of_the_set_and_order_independent():
    generator = random.Random(3)
    values = [generator.uniform(0, 1e6) for _ in range(999)]
    shuffled = values[::-1]
    assert len(set(values)) == 999
    assert Percentiles.of(values) == Percentiles.of(shuffled)
    group = Percentiles.of(values)
    assert {group.p50, group.p95, group.p99, group.max} <= set(values)
    assert group.max == max(values)
    assert Percentiles.of([]) == Percentiles(None, None, None, None)
    assert mean([1.0, 2.0, 4.5]) == 2.5 and mean([]) is None


# --- a small run built by hand -----------------------------------------------------------------

INFO = RunInfo(experts=256, top_k=2, cache_slots=64, pool_slots=66, d_model=4096, d_ff=14336,
               bytes_per_expert=99_090_432, dtype="q4_0", compute_workers=2, io_backend="uring")


def token(number, start, end, cycle, io_wait, compute, hits, misses, prefetch_used=0):
    record = TokenRecord(number, start, end, cycle, io_wait, compute, hits, misses, hits + misses, prefetch_used)
    return {"event": "token_done", "schema": 1, "process": "router", "ts": 1.0, **record.to_event_fields()}


def read(expert, latency, kind="foreground"):
    return {"event": "expert_read", **ReadRecord(expert, expert % 66, READ_NBYTES, latency, kind).to_event_fields()}


def small_run_events() -> list[dict]:
    """4 tokens, 4 reads; times are exact binary fractions so every figure below is exact."""
    return [
        {"event": "run_started", "schema": 1, "workload": "markov", **INFO.to_event_fields()},
        token(0, 100.0, 100.25, 250_000, 200_000, 40_000, hits=0, misses=2),
        read(5, 120_000), read(9, 180_000),
        {"event": "slot_evicted", "slot": 3},  # other events are ignored
        {"event": "prefetch_stats", **PrefetchCounters(1, 0, 0, 0, 0, 4).to_event_fields()},
        token(1, 100.25, 100.3125, 62_500, 0, 45_000, hits=2, misses=0),
        read(17, 90_000, "prefetch"), read(33, 60_000, "prefetch"),
        token(2, 100.3125, 100.4375, 125_000, 60_000, 38_000, hits=1, misses=1, prefetch_used=1),
        token(3, 100.5, 100.5625, 62_500, 0, 41_000, hits=2, misses=0),
        {"event": "prefetch_stats", **PrefetchCounters(3, 2, 1, 1, 1, 12).to_event_fields()},
    ]


def test_every_field_of_a_hand_built_run():
    summary = summarize(small_run_events(), INFO)
    assert summary.wall_s == 0.5625  # 100.5625 - 100.0: first start to last end, gaps included
    assert summary.tokens == 4
    assert summary.sustained_tps == 4 / 0.5625
    assert summary.bytes_read == 4 * 99_094_528 and summary.reads == 4
    assert summary.avg_throughput_mibps == pytest.approx(4 * 94.50390625 / 0.5625, rel=1e-15)
    assert (summary.hits, summary.misses, summary.lookups) == (5, 3, 8)
    assert (summary.prefetch_joins, summary.demand_misses) == (1, 2)  # token 2's miss joined a prefetch read
    assert summary.hit_rate_pct == 62.5
    assert (summary.experts, summary.top_k, summary.cache_slots, summary.pool_slots) == (256, 2, 64, 66)
    assert (summary.d_model, summary.d_ff, summary.bytes_per_expert, summary.dtype) == (4096, 14336, 99_090_432, "q4_0")
    assert (summary.prefetches_issued, summary.prefetches_completed, summary.prefetches_used,
            summary.prefetches_wasted, summary.prefetches_dropped, summary.predictor_observations) == (3, 2, 1, 1, 1, 12)
    # the read latencies go through the histogram: p50 within its resolution, p95/p99 (the maximum) exact
    assert summary.io_latency_us.p50 == pytest.approx(90_000, rel=LATENCY_RESOLUTION)
    assert summary.io_latency_us == Percentiles(summary.io_latency_us.p50, 180_000, 180_000, None)  # max: cycle_us
    assert summary.compute_us == Percentiles(40_000, 45_000, 45_000, None)
    assert summary.cycle_us == Percentiles(62_500, 250_000, 250_000, 250_000)
    assert summary.io_wait_us_per_token == 65_000.0  # 260,000 us over all 4 tokens, hits-only ones too
    assert summary.compute_us_per_token == 41_000.0
    assert summary.io_share_pct == pytest.approx(52.0, rel=1e-15)  # 260,000 / 500,000
    assert (summary.compute_workers, summary.io_backend) == (2, "uring")


def test_summaries_of_older_logs_read_without_the_stall_fields():
    data = summarize(small_run_events(), INFO).to_json_dict()
    older = {key: value for key, value in data.items() if key not in ("prefetch_joins", "demand_misses")}
    summary = RunSummary.from_json_dict(older)
    assert (summary.prefetch_joins, summary.demand_misses) == (0, 0)
    assert RunSummary.from_json_dict(data).demand_misses == 2


def test_json_keys_and_nesting():
    data = summarize(small_run_events(), INFO).to_json_dict()
    assert list(data)[: len(JSON_KEYS)] == JSON_KEYS
    assert data["io_latency_us"] == {"p50": pytest.approx(90_000, rel=LATENCY_RESOLUTION), "p95": 180_000,
                                     "p99": 180_000}
    assert data["compute_us"] == {"p50": 40_000, "p95": 45_000, "p99": 45_000}
    assert data["cycle_us"] == {"p50": 62_500, "p95": 250_000, "p99": 250_000, "max": 250_000}


def test_log_round_trip_gives_the_identical_summary():
    events = small_run_events()
    in_run = summarize(events, INFO)
    from_log = summarize_log_events(json.loads(json.dumps(event)) for event in events)
    assert from_log == in_run
    assert json.dumps(from_log.to_json_dict()) == json.dumps(in_run.to_json_dict())
    logged = json.loads(json.dumps({"event": "run_summary", **in_run.to_json_dict()}))
    assert RunSummary.from_json_dict(logged) == in_run


def test_no_prefetch_stats_and_no_reads():
    events = [e for e in small_run_events() if e["event"] not in ("prefetch_stats", "expert_read")]
    summary = summarize_log_events(events)
    assert (summary.prefetches_issued, summary.predictor_observations, summary.reads, summary.bytes_read) == (0, 0, 0, 0)
    assert summary.io_latency_us == Percentiles(None, None, None, None)
    assert "i/o latency: p50=n/a p95=n/a p99=n/a" in format_seed_block(summary)


def with_changed(index, **changes):
    events = small_run_events()
    events[index] = {**events[index], **changes}
    return events


@pytest.mark.parametrize("events, message", [
    ([e for e in small_run_events() if e["event"] != "run_started"], "no run_started event"),
    (small_run_events() + small_run_events()[:1], "the log holds 2 runs"),
    ([e for e in small_run_events() if e["event"] != "token_done"], "no token_done events"),
    (with_changed(1, schema=2), r"event 1 \(token_done\): log schema 2, this mer reads schema 1"),
    (with_changed(1, hits=1), "token 0 has hits 1 \\+ misses 2 != lookups 2"),
    (with_changed(6, token=0), r"event 6 \(token_done\): token 0 is logged twice"),
    (with_changed(2, kind="speculative"), "read kind 'speculative' is not one of foreground, prefetch"),
    (with_changed(2, nbytes=-1), "field 'nbytes' must not be negative"),
    (with_changed(2, nbytes=1.5), "field 'nbytes' must be an integer"),
    (with_changed(1, cycle_us="fast"), "field 'cycle_us' must be a finite number, got 'fast'"),
    (with_changed(1, t_end_s=99.0), "token 0 ends"),
    ([{k: v for k, v in e.items() if k != "io_wait_us"} for e in small_run_events()],
     r"event 1 \(token_done\): missing field 'io_wait_us'"),
    (with_changed(0, io_backend=None), r"event 0 \(run_started\): field 'io_backend' must be a string"),
])
def test_bad_logs_give_clear_errors(events, message):
    with pytest.raises(EventLogError, match=message):
        summarize_log_events(events)


def test_zero_wall_time_is_an_error():
    events = [token(0, 5.0, 5.0, 0, 0, 0, hits=2, misses=0)]
    with pytest.raises(EventLogError, match="wall time 0.0 s is not positive"):
        summarize(events, INFO)


# --- the seed's published run, rebuilt as events -------------------------------------------------

def seed_like_events() -> list[dict]:
    """5000 tokens whose nearest-rank percentiles, sums and counts are the seed's printed figures.

    Sorted compute: ranks 1-2500 at 40255 (p50), then 2249 values averaging 40992.1, ranks
    4750-4949 at 41631 (p95), ranks 4950-5000 at 60735 (p99): sum 204,252,500 = 5000 x 40850.5.
    Sorted cycle: 40287 x 2500 (p50), 42047 x 2250 (p95), 199 values averaging 116733.1, 286975 x 50
    (p99), 431615 (max): sum 233,333,500, so io_wait 28,863,500 (5000 x 5772.7) is 12.37% of it.
    """
    compute = [40255] * 2500 + [40993] * 307 + [40992] * 1942 + [41631] * 200 + [60735] * 51
    cycle = [40287] * 2500 + [42047] * 2250 + [116734] * 18 + [116733] * 181 + [286975] * 50 + [431615]
    io_wait = [113636] * 210 + [113635] * 44 + [0] * 4746  # the 254 tokens with a miss wait
    assert sum(compute) == 204_252_500 and sum(cycle) == 233_333_500 and sum(io_wait) == 28_863_500
    info = dataclasses.replace(INFO, cache_slots=256, pool_slots=258)
    events = [{"event": "run_started", **info.to_event_fields()}]
    for number in range(5000):
        start = number * 0.04
        end = 233.828879846 if number == 4999 else start + 0.03
        misses = 1 if number < 254 else 0
        events.append(token(number, start, end, cycle[number], io_wait[number], compute[number],
                            hits=2 - misses, misses=misses))
    latencies = [116543] * 128 + [233599] * 116 + [360191] * 10 + [400000] * 2
    kinds = ["foreground"] * 254 + ["prefetch"] * 2  # the seed printed only the 254 demand reads
    events += [read(expert, latency, kind) for expert, (latency, kind) in enumerate(zip(latencies, kinds))]
    events.append({"event": "prefetch_stats", **PrefetchCounters(2, 2, 2, 0, 0, 19996).to_event_fields()})
    return events


def test_seed_block_is_reproduced_from_events():
    lines = format_seed_block(summarize_log_events(seed_like_events())).splitlines()
    assert lines[:4] == SEED_BLOCK[:4]
    assert lines[4] == ("prefetches: issued=2 completed=2 used=2 wasted=0 dropped=0 predictor_observations=19996 "
                        "joins=0 demand_misses=254")
    assert lines[5] == "i/o: reads=256 bytes=24193.00 MiB"  # every read counted, as the bytes are
    assert lines[7:11] == SEED_BLOCK[7:11]
    # the read latencies go through the histogram: each within its resolution of the seed's figure
    printed = [int(part.split("=")[1][:-2]) for part in lines[6].split(": ")[1].split()]
    seed = [int(part.split("=")[1][:-2]) for part in SEED_BLOCK[6].split(": ")[1].split()]
    assert seed == [116543, 233599, 360191]
    assert all(abs(mine - theirs) <= theirs * LATENCY_RESOLUTION + 1 for mine, theirs in zip(printed, seed))
    assert lines[11] == "workers: compute=2 io_backend=uring"
    assert len(lines) == 12


def test_seed_summary_json_values():
    data = summarize_log_events(seed_like_events()).to_json_dict()
    assert data["hit_rate_pct"] == 97.46000000000001
    assert data["sustained_tps"] == 21.383158501605987
    assert data["avg_throughput_mibps"] == 103.46455072587074
    assert data["io_wait_us_per_token"] == 5772.7
    assert data["compute_us_per_token"] == 40850.5
    assert data["cycle_us"] == {"p50": 40287, "p95": 42047, "p99": 286975, "max": 431615}
    assert round(data["io_share_pct"], 2) == 12.37


def test_reads_finished_after_the_final_statistics_are_not_counted():
    """A prefetch read logged after the router took the I/O worker's statistics (read_index >= reads_counted)
    is in the log but not in the run's summary; summarizing the log must leave it out too."""
    events = [
        {"event": "run_started", "experts": 16, "top_k": 2, "cache_slots": 4, "pool_slots": 6, "d_model": 8,
         "d_ff": 32, "bytes_per_expert": 100, "dtype": "q4_0", "compute_workers": 1, "io_backend": "uring"},
        {"event": "token_done", "token": 0, "t_start_s": 1.0, "t_end_s": 2.0, "cycle_us": 1e6, "io_wait_us": 10.0,
         "compute_us": 5.0, "hits": 1, "misses": 1, "lookups": 2, "prefetch_used": 0},
        {"event": "expert_read", "expert_id": 3, "slot": 0, "nbytes": 4096, "latency_us": 100.0,
         "kind": "foreground", "read_index": 0},
        {"event": "prefetch_stats", "issued": 1, "completed": 0, "used": 0, "wasted": 0, "dropped": 0,
         "predictor_observations": 1, "reads_counted": 1},
        {"event": "expert_read", "expert_id": 5, "slot": 1, "nbytes": 4096, "latency_us": 90.0,
         "kind": "prefetch", "read_index": 1},
    ]
    summary = summarize_log_events(events)
    assert (summary.reads, summary.bytes_read) == (1, 4096)
    without_limit = [dict(event) for event in events]
    del without_limit[3]["reads_counted"]
    assert summarize_log_events(without_limit).reads == 2


def test_latency_histogram_percentiles_are_within_the_stated_resolution():
    """The histogram's percentiles are within LATENCY_RESOLUTION (1%) of the exact nearest-rank ones
    (0.5 us below 1 us), exact at the extremes, and its size does not depend on the number of values."""
    assert 0.0099 < LATENCY_RESOLUTION <= 0.01
    rng = random.Random(11)
    print("seed 11")
    for count in (1, 2, 7, 100, 5000):
        values = [rng.lognormvariate(6, 2) for _ in range(count)] + [0.25]
        histogram = LatencyHistogram.of(values)
        assert histogram.count == len(values) and len(histogram.counts) == len(LatencyHistogram.of([]).counts)
        for percent in (0, 1, 50, 90, 95, 99, 99.9, 100):
            exact, approximate = percentile(values, percent), histogram.percentile(percent)
            assert abs(approximate - exact) <= max(exact * LATENCY_RESOLUTION, 0.5) + 1e-9, (count, percent)
        assert (histogram.percentile(0), histogram.percentile(100)) == (min(values), max(values))
    assert LatencyHistogram.of([]).percentiles() == Percentiles(None, None, None, None)
    with pytest.raises(ValueError, match="non-negative"):
        LatencyHistogram.of([float("nan")])


def test_the_run_and_the_log_compute_the_same_read_figures():
    """In the run the reads come from the I/O worker's IoStats (counters and histogram); from a log, from the
    `expert_read` events: the same histogram code, so the summaries agree exactly (invariant 6)."""
    events = small_run_events()
    reads = [ReadRecord.from_event(event) for event in events if event["event"] == "expert_read"]
    stats = IoStats(1, "uring", True, ReadCounts(len(reads), sum(r.nbytes for r in reads)), ReadCounts(0, 0),
                    ReadCounts(0, 0), LatencyHistogram.of(r.latency_us for r in reads),
                    PrefetchCounts(0, 0, 0, 0, 0, 0), [], [0, -1], 0, 0)
    decoded = decode(encode(stats))
    in_run = summarize_log_events([e for e in events if e["event"] != "expert_read"], ReadFigures.of_stats(decoded))
    assert in_run == summarize_log_events(json.loads(json.dumps(event)) for event in events)
