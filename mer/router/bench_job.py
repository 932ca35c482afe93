"""The expert-streaming benchmark job, run by the router through the real graph.

One iteration ("token", as the seed counts) draws the routing decision(s) of the workload (one over
the flat pool of all layer-qualified experts, or one per MoE layer with `layered`) and for each:
tells the predictor, runs the k experts through `ExpertDispatcher` as generation does (one row, the
synthetic hidden state, per expert) and adds their outputs with the gate weights in the decision's
order. The next token's routing is drawn only after the current token completes, so any overlap of
reads with compute comes from prediction alone.

Every token is logged as `token_done`; the summary is computed from these events and the I/O
worker's final `IoStats`, exactly as `logs summarize` recomputes it from a log (`mer.metrics.summary`).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from mer.config import PipelineConfig
from mer.errors import ConfigError
from mer.compute.batches import weighted_sum
from mer.protocol import HiddenObserved, RoutingObserved, StartBenchmark, encode
from mer.runtime.ram_budget import pool_slots
from mer.router.compute_client import ComputeClient
from mer.router.io_client import IoClient
from mer.router.dispatcher import DispatchLog, ExpertStats
from mer.router.remote_dispatcher import job_dispatcher
from mer.router.job import Job, sends_hidden
from mer.routing.space import RoutingDecision, RoutingSpace
from mer.metrics.events import (PREDICTOR_STATS, PREFETCH_STATS, RUN_STARTED, RUN_SUMMARY, TOKEN_DONE, PrefetchCounters,
                            RunInfo, TokenRecord)
from mer.store.manifest import Manifest
from mer.metrics.summary import ReadFigures, RunSummary, predictor_summaries, summarize_log_events
from mer.routing.trace import TraceHeader, TraceWriter, read_trace
from mer.routing.workloads.factory import make_workload


@dataclass
class BenchJob(Job):
    config: PipelineConfig
    manifest: Manifest
    io: IoClient
    compute: ComputeClient
    observe: object  # a PUSH socket to the predictor
    log: object
    progress: object = None
    start: StartBenchmark = field(default_factory=StartBenchmark)
    outputs: list[np.ndarray] = field(default_factory=list)
    observations: int = 0

    def __post_init__(self):
        self.space = RoutingSpace.from_geometry(self.manifest.geometry, self.config.top_k, self.config.layered)
        self.workload = make_workload(
            self.config.workload, self.space, seed=self.config.seed, zipf_s=self.config.zipf_s,
            correlation=self.config.workload_correlation, trace_path=self.config.trace,
        )
        self.dispatcher = job_dispatcher(self.start, self.manifest, self.io, self.compute, self.config, self.log)
        self.send_hidden = sends_hidden(self.config)
        if self.send_hidden:
            check_trace_has_residuals(self.config.trace)

    def run_info(self, io_backend: str) -> RunInfo:
        layers = self.manifest.layers
        dtypes = sorted({m.dtype for layer in layers for m in layer.format.matrices})
        return RunInfo(
            experts=self.manifest.geometry.num_experts, top_k=self.config.top_k,
            cache_slots=self.config.cache_slots, pool_slots=pool_slots(self.config),
            d_model=self.manifest.geometry.d_model, d_ff=self.manifest.geometry.d_ff,
            bytes_per_expert=max(layer.format.payload_nbytes for layer in layers), dtype="/".join(dtypes),
            compute_workers=self.compute.num_workers, io_backend=io_backend,
        )

    async def run(self) -> RunSummary:
        info = self.run_info((await self.io.stats()).io_backend).to_event_fields()
        self.log.info(RUN_STARTED, **info, config=self.config.to_dict())
        events: list[dict] = [{"event": RUN_STARTED, **info}]
        record_trace = self.config.record_trace
        with TraceWriter(record_trace, TraceHeader.for_space(self.space)) if record_trace else nullcontext() as trace:
            for token in range(self.config.tokens):
                record = await self._run_token(token, trace)
                fields = record.to_event_fields()
                self.log.info(TOKEN_DONE, **fields)
                events.append({"event": TOKEN_DONE, **fields})
                if self.progress is not None:
                    self.progress(record)
        summary = await self._summarize(events)
        if self.config.dump_outputs:
            np.save(self.config.dump_outputs, np.stack(self.outputs))
        self.log.info(RUN_SUMMARY, **summary.to_json_dict())
        return summary

    async def close(self) -> None:
        await self.dispatcher.close()

    async def _run_token(self, token: int, trace) -> TokenRecord:
        started = time.monotonic()
        stats = ExpertStats()
        for decision in self.workload.next_token():
            if trace is not None:
                await trace.awrite(decision)
            stats.add(await self._run_decision(token, decision))
        ended = time.monotonic()
        return TokenRecord(token, started, ended, (ended - started) * 1e6, stats.io_wait_us, stats.compute_us,
                           stats.hits, stats.misses, stats.hits + stats.misses, stats.prefetch_joins)

    async def _run_decision(self, token: int, decision: RoutingDecision) -> ExpertStats:
        expert_ids = list(self.space.global_ids(decision))
        if self.send_hidden:  # the gate predictor replays the recorded residual (checked at start)
            await self.observe.send_multipart(encode(HiddenObserved(token, decision.layer, decision.hidden)))
        await self.observe.send_multipart(
            encode(RoutingObserved(token, decision.layer, expert_ids, list(decision.weights))))
        self.observations += 1
        dispatch = DispatchLog()
        # each expert on the token's synthetic hidden state, added with its gate weight in the decision's order
        x = synthetic_hidden_state(self.config.seed, token, decision.layer, self.manifest.geometry.d_model)
        outputs, stats = await self.dispatcher.run_experts(token, {expert_id: x for expert_id in expert_ids}, dispatch)
        output = weighted_sum([outputs[expert_id] for expert_id in expert_ids], decision.weights)  # [1, d_model]
        t_compute_end = time.monotonic()
        if self.config.log_file:  # docs/events.md: one per routing decision
            self.log.info("decision_done", token=token, layer=decision.layer, expert_ids=expert_ids,
                          hits=stats.hits, misses=stats.misses, t_acquire_start=dispatch.t_acquire_start,
                          t_acquire_end=dispatch.t_acquire_end, t_compute_end=t_compute_end,
                          jobs=[[job_id, worker] for job_id, worker in dispatch.jobs])
        if self.config.dump_outputs:
            self.outputs.append(output)
        return stats

    async def _summarize(self, events: list[dict]) -> RunSummary:
        """The summary from the tokens' events and the I/O worker's final `IoStats` (reads cut at `reads_counted`)."""
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


def synthetic_hidden_state(seed: int, token: int, layer: int, d_model: int) -> np.ndarray:
    """A deterministic standard-normal float32 hidden state of shape (1, d_model) per (seed, token, layer)."""
    return np.random.default_rng([seed, token, layer]).standard_normal((1, d_model), dtype=np.float32)


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


def progress_printer(total_tokens: int):
    """A live line on stderr (tokens/s, hit rate) when stderr is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        return None
    state = {"started": time.monotonic(), "hits": 0, "lookups": 0, "last": 0.0}

    def show(record) -> None:
        state["hits"] += record.hits
        state["lookups"] += record.lookups
        now = time.monotonic()
        if now - state["last"] < 0.2 and record.token + 1 < total_tokens:
            return
        state["last"] = now
        done = record.token + 1
        rate = done / max(now - state["started"], 1e-9)
        hit_rate = 100 * state["hits"] / max(state["lookups"], 1)
        end = "\n" if done == total_tokens else ""
        print(f"\r  token {done}/{total_tokens}  {rate:6.1f} tok/s  hit rate {hit_rate:5.1f}%",
              end=end, file=sys.stderr, flush=True)

    return show
