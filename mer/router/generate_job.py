"""The generation job, run by the router: THE generation loop (`mer.model.generate.generate_tokens`)
with THE forward pass placed on the graph (`mer.router.graph_forward`).

The router loads the model once (`mer.router.model_job`, with its dense weights resident: read into
the router's memory, so expert traffic cannot evict them). Each generated token goes
to the supervisor at once (`TokenGenerated`); routing decisions go to the predictor and, with
`record_trace`, to a trace. The summary is `mer.metrics.summary.GenerationSummary`; the I/O worker
counts the decode steps' reads apart from the prompt length on (`SplitReads`, sent before the first
acquire). With the gate predictor on, its per-layer accuracies are logged as `gate_layer_accuracy`.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from mer.model.forward import ForwardPass
from mer.model.generate import GenerationResult, generate_tokens
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.predict.fusion import GATE
from mer.protocol import StartGeneration, TokenGenerated
from mer.router.dispatcher import ExpertStats
from mer.router.graph_forward import DenseThread, GraphExperts
from mer.router.job import sends_hidden
from mer.router.model_job import ModelJob
from mer.metrics.summary import MIB, GenerationSummary, predictor_summaries
from mer.routing.trace import TraceHeader, TraceWriter


class GenerateJob(ModelJob):
    """One generation through the graph (see the module docstring)."""

    start: StartGeneration

    async def run(self) -> GenerationSummary:
        dense = DenseThread()
        try:
            model, warm_up_s = await self.load_model(dense)
            self.log.info("generation_started", model=self.start.model, architecture=model.hparams.architecture,
                          prompt_tokens=len(self.start.prompt_tokens), max_tokens=self.start.max_tokens,
                          dense_warm_up_s=round(warm_up_s, 3), cache_slots=self.config.cache_slots)
            await self.io.split_reads(len(self.start.prompt_tokens))  # the decode steps' reads, counted apart
            with self._open_trace(model) as trace:
                experts = self._experts(model, trace)
                result = await self._generate(ForwardPass(model, experts, dense, experts))
            if self.start.dump_logits:
                np.save(self.start.dump_logits, np.stack(result.step_logits) if result.step_logits
                        else np.zeros((0, model.vocab_size), np.float32))
            summary = await self._summary(result, experts)
            for entry in summary.predictors.get(GATE, {}).get("per_layer", []):
                self.log.info("gate_layer_accuracy", **entry)
            self.log.info("generation_summary", **summary.to_json_dict())
            return summary
        finally:
            dense.close()

    def _open_trace(self, model: MoEModel) -> TraceWriter | nullcontext:
        """The trace being recorded, or a context giving None without `record_trace`."""
        if not self.config.record_trace:
            return nullcontext()
        header = TraceHeader(len(model.moe_layers), model.hparams.num_experts, model.hparams.top_k)
        return TraceWriter(self.config.record_trace, header)

    def _experts(self, model: MoEModel, trace: TraceWriter | None) -> GraphExperts:
        config = self.config
        return GraphExperts(self.dispatcher, self.observe, self.log, num_moe_layers=len(model.moe_layers),
                            prompt_length=len(self.start.prompt_tokens), send_hidden=sends_hidden(config),
                            trace=trace, record_hidden=bool(config.record_trace and config.record_hidden),
                            log_blocks=bool(config.log_file))

    async def _generate(self, forward_pass: ForwardPass) -> GenerationResult:
        start = self.start
        prompt_length = len(start.prompt_tokens)

        async def stream(index: int, token: int) -> None:
            await self.send_control(TokenGenerated(index, token))
            if self.config.log_file:
                self.log.info("generation_token", index=index, token=token, position=prompt_length + index)

        async def prefilled(result: GenerationResult) -> None:
            self.log.info("generation_prefill_done", tokens=prompt_length, t_start=result.t_prefill_start,
                          t_end=result.t_prefill_end)

        result = await generate_tokens(
            forward_pass, start.prompt_tokens, start.max_tokens,
            Sampler(start.temperature, start.top_k, start.top_p, start.seed), end_ids=frozenset(start.end_ids),
            ignore_eos=start.ignore_eos, keep_logits=bool(start.dump_logits), keep_routings=False, on_token=stream,
            on_prefill=prefilled, prefill_chunk=self.config.prefill_chunk)
        self.log.info("generation_decode_done", steps=result.decode_steps, tokens=len(result.tokens),
                      stop_reason=result.stop_reason, t_start=result.t_prefill_end, t_end=result.t_end)
        return result

    async def _summary(self, result: GenerationResult, experts: GraphExperts) -> GenerationSummary:
        stats = await self.io.stats()
        reads, decode_bytes = stats.reads, stats.split_reads.nbytes  # split at the prompt length
        lookups = ExpertStats()
        lookups.add(experts.prefill)
        lookups.add(experts.decode)
        hits, misses = lookups.hits, lookups.misses
        steps, decode = result.decode_steps, result.decode_costs
        blocks = max(decode.moe_blocks, 1)
        return GenerationSummary(
            prompt_tokens=result.prompt_tokens, tokens=result.tokens, stop_reason=result.stop_reason,
            prefill_s=result.prefill_seconds, decode_s=result.decode_seconds, decode_steps=steps,
            prefill_tps=len(result.prompt_tokens) / result.prefill_seconds if result.prefill_seconds > 0 else 0.0,
            decode_tps=steps / result.decode_seconds if steps else 0.0,
            hits=hits, misses=misses, lookups=hits + misses, prefetch_joins=lookups.prefetch_joins,
            demand_misses=misses - lookups.prefetch_joins,
            hit_rate_pct=hit_rate_pct(lookups), prefill_hit_rate_pct=hit_rate_pct(experts.prefill),
            decode_hit_rate_pct=hit_rate_pct(experts.decode),
            reads=reads.reads, bytes_read=reads.nbytes, decode_bytes_read=decode_bytes,
            mib_read_per_token=decode_bytes / MIB / steps if steps else 0.0,
            prefetches_issued=stats.prefetch.issued, prefetches_used=stats.prefetch.used,
            prefetches_wasted=stats.prefetch.wasted, predictor_observations=experts.observations,
            predictors=predictor_summaries(stats.predictors),
            dense_us_per_block=decode.dense_us / blocks, expert_us_per_block=decode.expert_us / blocks,
            io_wait_us_per_block=experts.decode.io_wait_us / blocks,
            expert_compute_us_per_block=experts.decode.compute_us / blocks,
            other_us_per_token=decode.other_us / steps if steps else 0.0,
            cache_slots=self.config.cache_slots, compute_workers=self.compute_workers,
            io_backend=stats.io_backend,
        )


def hit_rate_pct(stats: ExpertStats) -> float:
    """Hits per lookup in percent (0 without lookups)."""
    lookups = stats.hits + stats.misses
    return 100.0 * stats.hits / lookups if lookups else 0.0
