"""The perplexity job, run by the router: THE perplexity loop (`mer.model.perplexity.perplexity_passes`)
with THE forward pass placed on the graph (`mer.router.graph_forward`), as generation places it.

Each chunk runs from an empty KV cache, expert-major in passes of at most `prefill_chunk` tokens; its
score goes to the supervisor at once (`PerplexityChunk`, the CLI's progress) and into the log
(`perplexity_chunk_done`). Every chunk restarts at position 0, but the I/O worker and the predictor
keep one clock that only moves forward (`RunClock`: chunk i's position p is token i x context + p),
as they do in a generation. The summary is `mer.metrics.summary.PerplexitySummary`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from mer.model.forward import ForwardPass, MoEBlockCosts
from mer.model.moe import Routing
from mer.model.perplexity import ChunkScore, PerplexityPlan, PerplexityResult, perplexity_passes
from mer.protocol import PerplexityChunk, StartPerplexity
from mer.router.generate_job import hit_rate_pct
from mer.router.graph_forward import DenseThread, GraphExperts
from mer.router.job import sends_hidden
from mer.router.model_job import ModelJob
from mer.metrics.summary import PerplexitySummary

NEVER_DECODE = 2**62  # every position of a perplexity run counts as prefill in `GraphExperts`


class RunClock:
    """The graph's experts and observer with each chunk's positions moved to the run's clock."""

    def __init__(self, experts: GraphExperts):
        self.experts = experts
        self.offset = 0

    def advance(self, positions: int) -> None:
        self.offset += positions

    async def __call__(self, moe_layer: int, batches: Mapping[int, np.ndarray], token: int) -> dict[int, np.ndarray]:
        return await self.experts(moe_layer, batches, token + self.offset)

    async def routed(self, moe_layer: int, positions: np.ndarray, residual: np.ndarray, routing: Routing) -> None:
        await self.experts.routed(moe_layer, positions + self.offset, residual, routing)

    async def block_done(self, costs: MoEBlockCosts) -> None:
        await self.experts.block_done(dataclasses.replace(costs, positions=costs.positions + self.offset))


class PerplexityJob(ModelJob):
    """One perplexity run through the graph (see the module docstring)."""

    start: StartPerplexity

    async def run(self) -> PerplexitySummary:
        dense = DenseThread()
        start = self.start
        try:
            model, warm_up_s = await self.load_model(dense)
            plan = PerplexityPlan(start.tokens, start.context, start.num_chunks, start.bos_id)
            self.log.info("perplexity_started", model=start.model, architecture=model.hparams.architecture,
                          text_tokens=len(start.tokens), context=start.context, chunks=start.num_chunks,
                          bos_id=start.bos_id, dense_warm_up_s=round(warm_up_s, 3),
                          cache_slots=self.config.cache_slots)
            experts = GraphExperts(self.dispatcher, self.observe, self.log, num_moe_layers=len(model.moe_layers),
                                   prompt_length=NEVER_DECODE, send_hidden=sends_hidden(self.config),
                                   log_blocks=bool(self.config.log_file))
            clock = RunClock(experts)

            async def chunk_done(score: ChunkScore, running_ppl: float) -> None:
                clock.advance(plan.context)
                self.log.info("perplexity_chunk_done", chunk=score.chunk, chunks=plan.num_chunks, count=score.count,
                              nll=score.nll, nll2=score.nll2, ppl=score.ppl, running_ppl=running_ppl,
                              seconds=round(score.seconds, 6))
                await self.send_control(PerplexityChunk(score.chunk, plan.num_chunks, score.count, score.nll,
                                                        score.nll2, running_ppl, score.seconds))

            result = await perplexity_passes(ForwardPass(model, clock, dense, clock), plan,
                                             prefill_chunk=self.config.prefill_chunk, on_chunk=chunk_done)
            summary = await self._summary(result, experts)
            self.log.info("perplexity_summary", **summary.to_json_dict())
            return summary
        finally:
            dense.close()

    async def _summary(self, result: PerplexityResult, experts: GraphExperts) -> PerplexitySummary:
        stats = await self.io.stats()
        tally, plan = result.tally, result.plan
        run_tokens = plan.num_chunks * plan.context
        return PerplexitySummary(
            context=plan.context, chunks=plan.num_chunks, text_tokens=len(plan.tokens), scored_tokens=tally.count,
            ppl=tally.ppl, ppl_error=tally.ppl_error, nll=tally.mean_nll,
            chunk_ppl=[score.ppl for score in tally.chunks], running_ppl=list(tally.running),
            seconds=result.seconds, tokens_per_s=run_tokens / result.seconds if result.seconds > 0 else 0.0,
            hits=experts.prefill.hits, misses=experts.prefill.misses, hit_rate_pct=hit_rate_pct(experts.prefill),
            reads=stats.reads.reads, bytes_read=stats.reads.nbytes, cache_slots=self.config.cache_slots,
            compute_workers=self.compute_workers, io_backend=stats.io_backend)
