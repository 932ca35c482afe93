"""`GET /metrics`: the server's figures in Prometheus text format (`prometheus-client`), one registry per server.

Measured by the HTTP side as requests go: `mer_requests_total{endpoint,status}`,
`mer_prompt_tokens_total`, `mer_generated_tokens_total`, `mer_time_to_first_token_seconds`,
`mer_inter_token_latency_seconds`, `mer_request_duration_seconds`, `mer_requests_in_flight`.
From each `ServeStep` of the router: `mer_steps_total`, `mer_batch_sequences` and `mer_batch_tokens`
(histograms per step). From the last `ServeStep` (the job's and the I/O worker's cumulative counters,
read when the page is asked for): `mer_expert_lookups_total{result=hit|miss}`, `mer_ssd_reads_total`,
`mer_ssd_bytes_read_total`, `mer_prefetches_total{outcome=issued|used|wasted}`,
`mer_io_wait_seconds_total`, `mer_expert_compute_seconds_total`, and the gauges `mer_ready`,
`mer_active_sequences`, `mer_waiting_sequences` (the queue depth in the router),
`mer_kv_positions_used`, `mer_kv_positions`, `mer_cache_slots`, `mer_max_sequences`; per compute worker
`mer_compute_worker_busy_seconds_total{worker}`; the cache now: `mer_cache_slots_used`,
`mer_cache_slots_pinned`, `mer_resident_experts{moe_layer}` (the slot map by layer) and
`mer_io_queue_depth` (reads in flight or queued). With `--cluster`, per remote shard group:
`mer_shard_{requests,rows,bytes_sent,bytes_received,failovers,errors,round_trip_seconds}_total{shard}` and
`mer_shard_down{shard}`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mer.protocol import ServeStep

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The registry and its metrics (see the module docstring)."""

    def __init__(self, last_step: Callable[[], ServeStep | None], in_flight: Callable[[], int], *,
                 kv_positions: int, cache_slots: int, max_sequences: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("mer_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("mer_prompt_tokens", "Prompt tokens of the requests served", registry=self.registry)
        self.generated_tokens = Counter("mer_generated_tokens", "Tokens generated for the requests",
                                        registry=self.registry)
        self.time_to_first_token = Histogram("mer_time_to_first_token_seconds", "From a request's arrival to its "
                                             "first generated token", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("mer_inter_token_latency_seconds", "Between consecutive tokens of a "
                                             "request", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_duration = Histogram("mer_request_duration_seconds", "From a request's arrival to its last "
                                          "token", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.steps = Counter("mer_steps", "Decode steps of the serving job", registry=self.registry)
        self.batch_sequences = Histogram("mer_batch_sequences", "Sequences per step", buckets=BATCH_BUCKETS,
                                         registry=self.registry)
        self.batch_tokens = Histogram("mer_batch_tokens", "Tokens per step (a newcomer's prompt included)",
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        in_flight_gauge = Gauge("mer_requests_in_flight", "Requests admitted and not finished (running or waiting)",
                                registry=self.registry)
        in_flight_gauge.set_function(in_flight)
        self.registry.register(_StepCollector(last_step, kv_positions, cache_slots, max_sequences))

    def on_step(self, step: ServeStep) -> None:
        if step.sequences:
            self.steps.inc()
            self.batch_sequences.observe(step.sequences)
            self.batch_tokens.observe(step.tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StepCollector:
    """The job's cumulative counters and gauges from its last `ServeStep`, read at each scrape."""

    def __init__(self, last_step: Callable[[], ServeStep | None], kv_positions: int, cache_slots: int,
                 max_sequences: int):
        self.last_step = last_step
        self.fixed = {"mer_kv_positions": (kv_positions, "KV positions of the pool"),
                      "mer_cache_slots": (cache_slots, "Expert cache slots"),
                      "mer_max_sequences": (max_sequences, "Sequences that decode together at most")}

    def collect(self):
        step = self.last_step()
        yield GaugeMetricFamily("mer_ready", "1 once the graph is up and the model loaded", value=int(step is not None))
        for name, (value, documentation) in self.fixed.items():
            yield GaugeMetricFamily(name, documentation, value=value)
        if step is None:
            return
        lookups = CounterMetricFamily("mer_expert_lookups", "Expert lookups of the MoE blocks", labels=["result"])
        lookups.add_metric(["hit"], step.hits)
        lookups.add_metric(["miss"], step.misses)
        yield lookups
        prefetches = CounterMetricFamily("mer_prefetches", "Prefetch reads by outcome", labels=["outcome"])
        for outcome in ("issued", "used", "wasted"):
            prefetches.add_metric([outcome], getattr(step, f"prefetches_{outcome}"))
        yield prefetches
        yield CounterMetricFamily("mer_ssd_reads", "Expert reads from the store", value=step.reads)
        yield CounterMetricFamily("mer_ssd_bytes_read", "Bytes read from the store into slots", value=step.bytes_read)
        yield CounterMetricFamily("mer_io_wait_seconds", "Time steps waited for expert reads",
                                  value=step.io_wait_us / 1e6)
        yield CounterMetricFamily("mer_expert_compute_seconds", "Time of the experts' batch jobs",
                                  value=step.compute_us / 1e6)
        busy = CounterMetricFamily("mer_compute_worker_busy_seconds", "Kernel time of each compute worker's batch jobs",
                                   labels=["worker"])
        for worker, busy_us in enumerate(step.worker_busy_us):
            busy.add_metric([str(worker)], busy_us / 1e6)
        yield busy
        resident = GaugeMetricFamily("mer_resident_experts", "Experts in the cache (resident or loading) per MoE layer",
                                     labels=["moe_layer"])
        for layer, count in enumerate(step.resident_experts):
            resident.add_metric([str(layer)], count)
        yield resident
        for name, value, documentation in (("mer_active_sequences", step.active, "Sequences decoding"),
                                           ("mer_waiting_sequences", step.waiting, "Sequences waiting in the router"),
                                           ("mer_kv_positions_used", step.kv_positions_used, "KV positions held"),
                                           ("mer_cache_slots_used", step.slots_used, "Slots holding an expert"),
                                           ("mer_cache_slots_pinned", step.slots_pinned, "Slots of pinned experts"),
                                           ("mer_io_queue_depth", step.io_queue_depth, "Reads in flight or queued")):
            yield GaugeMetricFamily(name, documentation, value=value)
        if step.shard_links:
            yield from _shard_link_metrics(step)


SHARD_COUNTERS = (("requests", "Layer requests a remote shard group answered"),
                  ("rows", "Hidden-state rows a remote shard group computed"),
                  ("bytes_sent", "Bytes of hidden states sent to a remote shard group"),
                  ("bytes_received", "Bytes of expert outputs received from a remote shard group"),
                  ("failovers", "Requests given up to a replica after a shard's deadline"),
                  ("errors", "Error replies from a remote shard group"))


def _shard_link_metrics(step: ServeStep):
    """`mer_shard_*_total{shard}` and `mer_shard_down{shard}` (`serve --cluster`, docs/scale-out.md)."""
    for name, documentation in SHARD_COUNTERS:
        family = CounterMetricFamily(f"mer_shard_{name}", documentation, labels=["shard"])
        for link in step.shard_links:
            family.add_metric([str(link.shard)], getattr(link, name))
        yield family
    round_trips = CounterMetricFamily("mer_shard_round_trip_seconds", "Round trips of the layer requests answered, "
                                      "send to answer at the router", labels=["shard"])
    down = GaugeMetricFamily("mer_shard_down", "1 once a shard group is marked down (it failed over)", labels=["shard"])
    for link in step.shard_links:
        round_trips.add_metric([str(link.shard)], link.round_trip_us_total / 1e6)
        down.add_metric([str(link.shard)], int(link.down))
    yield round_trips
    yield down
