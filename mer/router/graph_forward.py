"""The model's forward pass driven by the router: dense steps in one thread, experts through the graph.

Placement: the dense steps (embedding, attention with the KV cache, norms, router gates, grouping,
the gate-weighted combine, LM head and sampling) run in ONE router thread (`DenseThread`), so the
router's event loop never blocks and keeps serving the I/O and compute sockets; the experts run on
the compute workers (`ExpertDispatcher`). The thread counts in the core budget as one more thread
than `compute_workers x kernel_threads`; it is busy while the workers wait and idle while they
compute (a block's experts need its routing, the next block needs the experts), so the two rarely
run at once. See docs/model.md ("The generation path") for the measured per-block costs.

Per MoE block: attention + ffn_norm + gate + expert-major grouping (thread) -> routing observed by
the predictor (one `RoutingObserved` per token, global ids; with `send_hidden`, for the next-layer
gate predictor, each preceded by a `HiddenObserved` with the token's post-attention residual) ->
experts (graph) -> combine exactly as `mer.model.moe.combine_experts` (thread). Each MoE block logs
`moe_block_done` with its dense and expert microseconds.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mer.model.attention import KVCache, next_positions
from mer.model.model import MoEModel
from mer.model.moe import Routing, combine_experts, expert_batches, group_by_expert
from mer.protocol import HiddenObserved, RoutingObserved, encode
from mer.router.expert_client import ExpertDispatcher, ExpertStats
from mer.routing import RoutingDecision

class DenseThread:
    """The router's single thread for dense compute; `await run(f, *args)` never blocks the event loop."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-dense")

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class ForwardCosts:
    """Where one or more forward passes spent their time, in microseconds."""

    moe_blocks: int = 0
    dense_us: float = 0.0  # attention, norms, gate, grouping and combine of the MoE blocks
    expert_us: float = 0.0  # the experts' round trip: acquire, batch jobs, partials, release
    other_us: float = 0.0  # embedding, dense FFN blocks, LM head
    experts: ExpertStats = field(default_factory=ExpertStats)

    def add(self, other: "ForwardCosts") -> None:
        self.moe_blocks += other.moe_blocks
        self.dense_us += other.dense_us
        self.expert_us += other.expert_us
        self.other_us += other.other_us
        self.experts.add(other.experts)


class GraphForward:
    """Runs new tokens through the model (see the module docstring)."""

    def __init__(self, model: MoEModel, dispatcher: ExpertDispatcher, dense: DenseThread, observe, log,
                 log_blocks: bool = False, send_hidden: bool = False, record_hidden: bool = False):
        self.model = model
        self.dispatcher = dispatcher
        self.dense = dense
        self.observe = observe  # a PUSH socket to the predictor
        self.send_hidden = send_hidden  # the gate predictor is on: it gets each token's residual too
        self.record_hidden = record_hidden  # decisions keep their token's residual (for the trace)
        self.log = log
        self.log_blocks = log_blocks
        self.observations = 0

    async def forward(self, token_ids: list[int], kv_cache: KVCache,
                      decisions: list[RoutingDecision]) -> tuple[np.ndarray, ForwardCosts]:
        """The last token's logits `[vocab]` after `token_ids` (continuing `kv_cache`), and the costs;
        every routing decision is appended to `decisions` (layer-major)."""
        costs = ForwardCosts()
        positions = next_positions(kv_cache, 0, len(token_ids))
        started = time.perf_counter()
        hidden = await self.dense.run(self.model.embed, token_ids)
        costs.other_us += (time.perf_counter() - started) * 1e6
        for block in range(self.model.hparams.num_blocks):
            hidden = await self._block(block, hidden, kv_cache, positions, costs, decisions)
        started = time.perf_counter()
        logits = await self.dense.run(self.model.logits, hidden[-1:])
        costs.other_us += (time.perf_counter() - started) * 1e6
        return logits[-1], costs

    async def _block(self, block: int, hidden: np.ndarray, kv_cache: KVCache, positions: np.ndarray,
                     costs: ForwardCosts, decisions: list[RoutingDecision]) -> np.ndarray:
        started = time.perf_counter()
        hidden, normed, routing, groups, batches = await self.dense.run(
            self._front, block, hidden, kv_cache, positions)
        dense_us = (time.perf_counter() - started) * 1e6
        if routing is None:
            costs.other_us += dense_us
            return hidden
        moe_layer = self.model.moe_layers[block]
        await self._observe(moe_layer, positions, hidden, routing, decisions)
        started = time.perf_counter()
        outputs, stats = await self.dispatcher.run(moe_layer, int(positions[-1]), batches)
        expert_us = (time.perf_counter() - started) * 1e6
        started = time.perf_counter()
        hidden = await self.dense.run(self._combine, hidden, routing, groups, outputs)
        dense_us += (time.perf_counter() - started) * 1e6
        costs.moe_blocks += 1
        costs.dense_us += dense_us
        costs.expert_us += expert_us
        costs.experts.add(stats)
        if self.log_blocks:
            self.log.info("moe_block_done", token=int(positions[-1]), tokens=len(positions), block=block,
                          moe_layer=moe_layer, experts=len(batches), dense_us=round(dense_us, 1),
                          expert_us=round(expert_us, 1), io_wait_us=round(stats.io_wait_us, 1),
                          compute_us=round(stats.compute_us, 1), hits=stats.hits, misses=stats.misses,
                          prefetch_joins=stats.prefetch_joins, chunks=stats.chunks)
        return hidden

    def _front(self, block: int, hidden: np.ndarray, kv_cache: KVCache, positions: np.ndarray):
        """Dense thread: attention, ffn_norm, then the gate and expert-major batches (or the dense FFN)."""
        model = self.model
        hidden = model.attention_block(block, hidden, kv_cache, positions)
        normed = model.ffn_input(block, hidden)
        if not model.is_moe_block(block):
            return hidden + model.dense_ffn(block, normed), None, None, None, None
        routing = model.route(block, normed)
        groups = group_by_expert(routing)
        return hidden, normed, routing, groups, expert_batches(normed, groups)

    def _combine(self, hidden: np.ndarray, routing: Routing, groups, outputs) -> np.ndarray:
        return hidden + combine_experts(routing, groups, outputs, self.model.hparams.d_model)

    async def _observe(self, moe_layer: int, positions: np.ndarray, hidden: np.ndarray, routing: Routing,
                       decisions: list[RoutingDecision]) -> None:
        """One `RoutingObserved` per token (global ids) to the predictor, before the experts are acquired;
        with `send_hidden`, each after a `HiddenObserved` of the token's residual `hidden[index]`."""
        for index, position in enumerate(positions):
            experts = [int(expert) for expert in routing.experts[index]]
            weights = [float(weight) for weight in routing.weights[index]]
            global_ids = [self.dispatcher.global_id(moe_layer, expert) for expert in experts]
            if self.send_hidden:
                await self.observe.send_multipart(encode(HiddenObserved(int(position), moe_layer, hidden[index])))
            await self.observe.send_multipart(encode(RoutingObserved(int(position), moe_layer, global_ids, weights)))
            self.observations += 1
            residual = hidden[index].copy() if self.record_hidden else None
            decisions.append(RoutingDecision(int(position), moe_layer, tuple(experts), tuple(weights), residual))
