"""The generation job, run by the router: prefill the prompt, then decode token by token.

The same loop as the single-process `mer.model.generate` (prefill as one expert-major batch, then
one token per step; stop after `max_tokens`, on an end id unless `ignore_eos`, or when the context
is full), with the forward pass of `mer.router.graph_forward`: the experts stream through the I/O
worker's slots and are computed by the compute workers. Each generated token goes to the supervisor
at once (`TokenGenerated`); routing decisions go to the predictor and, with `record_trace`, to a
trace (layered: one decision per MoE layer per token, ids within the layer, written token by token).

The summary (`JobDone`) holds the tokens, timings and cache figures; `mib_read_per_token` counts
the bytes the I/O worker read for the decode steps (reads started by an acquire or by prefetch
hints of a generated token's position; the I/O worker counts them apart from the prompt length on,
which the job names with `SplitReads` before its first acquire) per decode step. Expert lookups are `hits`, `prefetch_joins`
(misses that joined a prefetch read already in flight) and `demand_misses` (reads the foreground had
to start): hits + prefetch_joins + demand_misses = lookups. With the gate predictor on, the router
also sends each token's residual to the predictor (`gate_hints_on`), and the gate's per-layer
accuracies (`predictors.gate.per_layer`) are logged as `gate_layer_accuracy` events.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from mer.config import PipelineConfig
from mer.errors import ContextLengthError
from mer.model.generate import STOP_CONTEXT, STOP_END_OF_GENERATION, STOP_MAX_TOKENS
from mer.model.model import MoEModel, check_model_matches_store
from mer.model.sampling import Sampler
from mer.protocol import TokenGenerated
from mer.router.clients import ComputeClient, IoClient
from mer.predict.fusion import GATE
from mer.router.expert_client import ExpertDispatcher, ExpertStats
from mer.router.generation_request import GenerationRequest
from mer.router.graph_forward import DenseThread, ForwardCosts, GraphForward
from mer.routing import RoutingDecision
from mer.store.manifest import Manifest
from mer.summary import predictor_summaries
from mer.trace import TraceHeader, TraceWriter

MIB = 2**20


@dataclass
class PhaseCosts:
    """Prefill and decode: wall seconds and forward costs."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prefill: ForwardCosts | None = None
    decode: ForwardCosts | None = None


class GenerateJob:
    """One generation through the graph (see the module docstring)."""

    def __init__(self, request: GenerationRequest, config: PipelineConfig, manifest: Manifest, io: IoClient,
                 compute: ComputeClient, observe, log, send_control: Callable[[object], Awaitable[None]]):
        self.request = request
        self.config = config
        self.manifest = manifest
        self.io = io
        self.log = log
        self.send_control = send_control
        self.dense = DenseThread()
        self.dispatcher = ExpertDispatcher(manifest, io, compute, max_leases=config.cache_slots)
        self.compute_workers = compute.num_workers
        self.observe = observe
        self.step_logits: list[np.ndarray] = []

    async def run(self) -> dict:
        try:
            model = await self.dense.run(MoEModel.load, self.request.model)
            check_model_matches_store(model, self.manifest, self.request.model)
            warm_up_s = await self.dense.run(warm_up_dense, model)
            forward = GraphForward(model, self.dispatcher, self.dense, self.observe, self.log,
                                   log_blocks=bool(self.config.log_file), send_hidden=gate_hints_on(self.config),
                                   record_hidden=bool(self.config.record_trace and self.config.record_hidden))
            self.log.info("generation_started", model=self.request.model, architecture=model.hparams.architecture,
                          prompt_tokens=len(self.request.prompt_tokens), max_tokens=self.request.max_tokens,
                          dense_warm_up_s=round(warm_up_s, 3), cache_slots=self.config.cache_slots)
            trace = self._open_trace(model)
            await self.io.split_reads(len(self.request.prompt_tokens))  # the decode steps' reads, counted apart
            try:
                tokens, stop_reason, phases = await self._generate(model, forward, trace)
            finally:
                if trace is not None:
                    trace.close()
            if self.request.dump_logits:
                np.save(self.request.dump_logits, np.stack(self.step_logits) if self.step_logits
                        else np.zeros((0, model.vocab_size), np.float32))
            summary = await self._summary(tokens, stop_reason, phases, forward.observations)
            for entry in summary["predictors"].get(GATE, {}).get("per_layer", []):
                self.log.info("gate_layer_accuracy", **entry)
            self.log.info("generation_summary", **summary)
            return summary
        finally:
            self.dense.close()

    def _open_trace(self, model: MoEModel) -> TraceWriter | None:
        if not self.config.record_trace:
            return None
        header = TraceHeader(len(model.moe_layers), model.hparams.num_experts, model.hparams.top_k)
        return TraceWriter(self.config.record_trace, header)

    async def _generate(self, model: MoEModel, forward: GraphForward, trace) -> tuple[list[int], str, PhaseCosts]:
        request, prompt = self.request, list(self.request.prompt_tokens)
        context = model.hparams.context_length
        if len(prompt) > context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens, the model's context is {context}")
        kv_cache = await self.dense.run(model.new_kv_cache, min(context, len(prompt) + request.max_tokens) or 1)
        sampler = Sampler(request.temperature, request.top_k, request.top_p, request.seed)
        phases = PhaseCosts()
        started = time.perf_counter()
        logits, phases.prefill = await self._forward(forward, prompt, kv_cache, trace)
        phases.prefill_s = time.perf_counter() - started
        phases.decode = ForwardCosts()
        tokens: list[int] = []
        stop_reason = STOP_MAX_TOKENS
        started = time.perf_counter()
        while len(tokens) < request.max_tokens:
            token = await self.dense.run(sampler.sample, logits)
            tokens.append(token)
            self.step_logits.append(logits)
            await self.send_control(TokenGenerated(len(tokens) - 1, token))
            if self.config.log_file:
                self.log.info("generation_token", index=len(tokens) - 1, token=token, position=kv_cache.length)
            if token in request.end_ids and not request.ignore_eos:
                stop_reason = STOP_END_OF_GENERATION
                break
            if len(tokens) == request.max_tokens:
                break
            if kv_cache.length >= kv_cache.capacity:
                stop_reason = STOP_CONTEXT
                break
            logits, costs = await self._forward(forward, [token], kv_cache, trace)
            phases.decode.add(costs)
            phases.decode_steps += 1
        phases.decode_s = time.perf_counter() - started
        return tokens, stop_reason, phases

    async def _forward(self, forward: GraphForward, token_ids: list[int], kv_cache, trace):
        decisions: list[RoutingDecision] = []
        logits, costs = await forward.forward(token_ids, kv_cache, decisions)
        if trace is not None:  # token-major, as a trace is read
            for decision in sorted(decisions, key=lambda decision: (decision.token, decision.layer)):
                await trace.awrite(decision)
        return logits, costs

    async def _summary(self, tokens: list[int], stop_reason: str, phases: PhaseCosts, observations: int) -> dict:
        stats = await self.io.stats()
        prompt_length = len(self.request.prompt_tokens)
        reads, decode_bytes = stats.reads, stats.split_reads.nbytes  # split at the prompt length
        experts = ExpertStats()
        experts.add(phases.prefill.experts)
        experts.add(phases.decode.experts)
        lookups, hits = experts.hits + experts.misses, experts.hits
        decode = phases.decode
        blocks = max(decode.moe_blocks, 1)
        return {
            "kind": "generate", "prompt_tokens": list(self.request.prompt_tokens), "tokens": tokens,
            "stop_reason": stop_reason, "prefill_s": phases.prefill_s, "decode_s": phases.decode_s,
            "decode_steps": phases.decode_steps,
            "prefill_tps": prompt_length / phases.prefill_s if phases.prefill_s > 0 else 0.0,
            "decode_tps": phases.decode_steps / phases.decode_s if phases.decode_steps else 0.0,
            "hits": hits, "misses": lookups - hits, "lookups": lookups,
            "prefetch_joins": experts.prefetch_joins, "demand_misses": experts.misses - experts.prefetch_joins,
            "hit_rate_pct": 100.0 * hits / lookups if lookups else 0.0,
            "reads": reads.reads, "bytes_read": reads.nbytes, "decode_bytes_read": decode_bytes,
            "mib_read_per_token": decode_bytes / MIB / phases.decode_steps if phases.decode_steps else 0.0,
            "prefetches_issued": stats.prefetch.issued, "prefetches_used": stats.prefetch.used,
            "prefetches_wasted": stats.prefetch.wasted, "predictor_observations": observations,
            "predictors": predictor_summaries(stats.predictors),
            "dense_us_per_block": decode.dense_us / blocks if decode.moe_blocks else 0.0,
            "expert_us_per_block": decode.expert_us / blocks if decode.moe_blocks else 0.0,
            "io_wait_us_per_block": decode.experts.io_wait_us / blocks if decode.moe_blocks else 0.0,
            "expert_compute_us_per_block": decode.experts.compute_us / blocks if decode.moe_blocks else 0.0,
            "other_us_per_token": decode.other_us / phases.decode_steps if phases.decode_steps else 0.0,
            "cache_slots": self.config.cache_slots, "compute_workers": self.compute_workers,
            "io_backend": stats.io_backend,
        }


def gate_hints_on(config: PipelineConfig) -> bool:
    """Whether the router sends its hidden states to the predictor: the gate predictor hints (with prefetch)."""
    return config.prefetch and GATE in config.predictors


def warm_up_dense(model: MoEModel) -> float:
    """Compile (or load from numba's cache) the dense kernels on a throwaway one-token pass of the
    first block and the LM head, so that the prefill time does not include it; returns seconds."""
    started = time.perf_counter()
    cache = model.new_kv_cache(1)
    hidden = model.attention_block(0, model.embed([0]), cache, np.arange(1))
    normed = model.ffn_input(0, hidden)
    if model.is_moe_block(0):
        model.route(0, normed)
    else:
        model.dense_ffn(0, normed)
    model.logits(hidden)
    return time.perf_counter() - started
