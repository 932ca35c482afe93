"""The expert-streaming benchmark job, run by the router through the real graph.

One iteration ("token", as the seed counts) draws the routing decision(s) of the workload — one over
the flat pool of all layer-qualified experts, or one per MoE layer with `layered` — and for each:
tells the predictor (so it can prefetch for the next token while this one computes), acquires the
k experts from the I/O worker (hits, misses, joined prefetches), sends the SwiGLU slices to the
compute workers, combines the partials with the gate weights, and releases the leases. The next
token's routing is drawn only after the current token completes, so any overlap of reads with
compute comes from prediction alone.

Every token is logged as a `token_done` event; the summary is computed from these events and the
I/O worker's final `IoStats` (read counts, bytes, latency histogram, prefetch counters:
`mer.summary`), exactly as `logs summarize` recomputes it from a log file's `expert_read` events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mer.config import PipelineConfig
from mer.errors import ConfigError
from mer.predict.fusion import GATE, parse_predictor_names
from mer.protocol import ComputeItem, HiddenObserved, RoutingObserved, SlotGrant, encode
from mer.router.clients import ComputeClient, IoClient
from mer.router.hidden_states import synthetic_hidden_state
from mer.routing import RoutingDecision, RoutingSpace
from mer.run_events import PREDICTOR_STATS, PREFETCH_STATS, RUN_STARTED, TOKEN_DONE, PrefetchCounters, RunInfo, TokenRecord
from mer.slicing import combine_partials, plan_slices
from mer.store.manifest import Manifest
from mer.summary import ReadFigures, RunSummary, predictor_summaries, summarize_log_events
from mer.trace import TraceHeader, TraceWriter, read_trace
from mer.workloads.factory import make_workload


@dataclass
class TokenTimer:
    """What one token spent where, in microseconds."""

    io_wait_us: float = 0.0
    compute_us: float = 0.0
    hits: int = 0
    misses: int = 0
    prefetch_used: int = 0


@dataclass
class BenchJob:
    config: PipelineConfig
    manifest: Manifest
    io: IoClient
    compute: ComputeClient
    observe: object  # a PUSH socket to the predictor
    log: object
    progress: object = None
    outputs: list[np.ndarray] = field(default_factory=list)
    observations: int = 0

    def __post_init__(self):
        geometry = self.manifest.geometry
        self.space = RoutingSpace.from_geometry(geometry, self.config.top_k, self.config.layered)
        self.workload = make_workload(
            self.config.workload, self.space, seed=self.config.seed, zipf_s=self.config.zipf_s,
            correlation=self.config.workload_correlation, trace_path=self.config.trace,
        )
        self.slices = [plan_slices(layer.format) for layer in self.manifest.layers]
        self.send_hidden = self.config.prefetch and GATE in parse_predictor_names(self.config.predictors)
        if self.send_hidden:
            check_trace_has_residuals(self.config.trace)

    def run_info(self, io_backend: str) -> RunInfo:
        layers = self.manifest.layers
        dtypes = sorted({m.dtype for layer in layers for m in layer.format.matrices})
        return RunInfo(
            experts=self.manifest.geometry.num_experts, top_k=self.config.top_k,
            cache_slots=self.config.cache_slots, pool_slots=self.config.cache_slots + self._reserve(),
            d_model=self.manifest.geometry.d_model, d_ff=self.manifest.geometry.d_ff,
            bytes_per_expert=max(layer.format.payload_nbytes for layer in layers), dtype="/".join(dtypes),
            compute_workers=self.compute.num_workers, io_backend=io_backend,
        )

    def _reserve(self) -> int:
        return self.config.predict_fanout if self.config.prefetch else 0

    async def run(self) -> RunSummary:
        io_stats = await self.io.stats()
        events: list[dict] = [{"event": RUN_STARTED, **self.run_info(io_stats.io_backend).__dict__}]
        self.log.info(RUN_STARTED, **{k: v for k, v in events[0].items() if k != "event"},
                      config=self.config.to_dict())
        trace = TraceWriter(self.config.record_trace, TraceHeader.for_space(self.space)) if self.config.record_trace else None
        try:
            for token in range(self.config.tokens):
                record = await self._run_token(token, trace)
                fields = record.to_event_fields()
                self.log.info(TOKEN_DONE, **fields)
                events.append({"event": TOKEN_DONE, **fields})
                if self.progress is not None:
                    self.progress(record)
        finally:
            if trace is not None:
                trace.close()
        return await self._summarize(events)

    async def _run_token(self, token: int, trace) -> TokenRecord:
        started = time.monotonic()
        timer = TokenTimer()
        for decision in self.workload.next_token():
            if trace is not None:
                trace.write(decision)
            await self._run_decision(token, decision, timer)
        ended = time.monotonic()
        lookups = timer.hits + timer.misses
        return TokenRecord(token, started, ended, (ended - started) * 1e6, timer.io_wait_us, timer.compute_us,
                           timer.hits, timer.misses, lookups, timer.prefetch_used)

    async def _run_decision(self, token: int, decision: RoutingDecision, timer: TokenTimer) -> None:
        expert_ids = list(self.space.global_ids(decision))
        if self.send_hidden:  # the gate predictor replays the recorded residual (checked at start)
            await self.observe.send_multipart(encode(HiddenObserved(token, decision.layer, decision.hidden)))
        await self.observe.send_multipart(
            encode_observation(token, decision.layer, expert_ids, list(decision.weights)))
        self.observations += 1
        t_acquire_start = time.monotonic()
        acquire_started = time.perf_counter()
        grants = await self.io.acquire(token, expert_ids)
        acquire_us = (time.perf_counter() - acquire_started) * 1e6
        t_acquire_end = time.monotonic()
        dispatched: list[tuple[int, int]] = []
        misses = sum(not grant.hit for grant in grants)
        timer.hits += len(grants) - misses
        timer.misses += misses
        timer.prefetch_used += sum(grant.joined_prefetch for grant in grants)
        if misses:
            timer.io_wait_us += acquire_us
        try:
            compute_started = time.perf_counter()
            output = await self._compute(token, decision, grants, dispatched)
            timer.compute_us += (time.perf_counter() - compute_started) * 1e6
            t_compute_end = time.monotonic()
        finally:
            await self.io.release([grant.ref for grant in grants])
        if self.config.log_file:  # docs/events.md: one per routing decision
            self.log.info("decision_done", token=token, layer=decision.layer, expert_ids=expert_ids,
                          hits=len(grants) - misses, misses=misses, t_acquire_start=t_acquire_start,
                          t_acquire_end=t_acquire_end, t_compute_end=t_compute_end,
                          jobs=[[job_id, worker] for job_id, worker in dispatched])
        if self.config.dump_outputs:
            self.outputs.append(output)

    async def _compute(self, token: int, decision: RoutingDecision, grants: list[SlotGrant],
                       dispatched: list[tuple[int, int]] | None = None) -> np.ndarray:
        per_layer = self.manifest.geometry.experts_per_layer
        items = [ComputeItem(g.expert_id, g.slot, g.generation, g.expert_id // per_layer) for g in grants]
        moe_layers = {item.moe_layer for item in items}
        x = synthetic_hidden_state(self.config.seed, token, decision.layer, self.manifest.geometry.d_model)
        output = np.zeros_like(x)
        for moe_layer in sorted(moe_layers):  # the flat pool may mix layers of different formats
            chosen = [index for index, item in enumerate(items) if item.moe_layer == moe_layer]
            partials = await self.compute.compute([items[i] for i in chosen], self.slices[moe_layer], x, dispatched)
            output += combine_partials(partials, np.array([decision.weights[i] for i in chosen], np.float32))
        return output

    async def _summarize(self, events: list[dict]) -> RunSummary:
        """The summary from the tokens' events and the I/O worker's final `IoStats` (its reads as a
        histogram: `logs summarize` recomputes the same from the `expert_read` events, cut at `reads_counted`)."""
        io_stats = await self.io.stats()
        prefetch = io_stats.prefetch
        counters = PrefetchCounters(issued=prefetch.issued, completed=prefetch.completed, used=prefetch.used,
                                    wasted=prefetch.wasted, dropped=prefetch.dropped,
                                    predictor_observations=self.observations)
        predictors = predictor_summaries(io_stats.predictors)
        self.log.info(PREFETCH_STATS, **counters.to_event_fields(), predictors=predictors,
                      reads_counted=io_stats.reads.reads)
        for name, predictor in predictors.items():
            self.log.info(PREDICTOR_STATS, predictor=name, **{k: v for k, v in predictor.items() if k != "per_layer"})
        events.append({"event": PREFETCH_STATS, **counters.to_event_fields(), "predictors": predictors})
        return summarize_log_events(events, ReadFigures.of_stats(io_stats))


def check_trace_has_residuals(trace_path) -> None:
    """The gate predictor in a benchmark replays residuals: the trace's decisions must carry them."""
    if trace_path is None:
        raise ConfigError("predictors: the gate predictor in a benchmark run replays a trace recorded with "
                          "residuals: --workload replay --trace FILE (generate --record-trace FILE --record-hidden)")
    _, decisions = read_trace(trace_path)
    first = next(decisions, None)
    if first is None or first.hidden is None:
        raise ConfigError(f"{trace_path}: the trace holds no residuals ('hidden'), which the gate predictor "
                          f"replays; record it with generate --record-trace FILE --record-hidden")


def encode_observation(token: int, layer: int, expert_ids: list[int], weights: list[float]):
    return encode(RoutingObserved(token, layer, expert_ids, weights))
