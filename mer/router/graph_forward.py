"""The router's placement of the forward pass (`mer.model.forward.ForwardPass`): dense steps in ONE
router thread (`DenseThread`, so the event loop never blocks; why: docs/model.md, "Dense placement"),
experts on the compute workers (`ExpertDispatcher`), routing to the predictor and the trace.

`GraphExperts` is the pass's experts and its observer: before a MoE block's experts, the routing
goes to the predictor (one `RoutingObserved` per token, global ids; with `send_hidden`, each preceded
by a `HiddenObserved` with the token's post-attention residual) and, with a trace, into it
(token-major, written once the pass's last MoE block is done); after it, the block's costs are
counted (prefill and decode apart: positions from `prompt_length` on are decode steps) and, with
`log_blocks`, logged as `moe_block_done`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mer.model.forward import MoEBlockCosts
from mer.model.moe import Routing
from mer.protocol import HiddenObserved, RoutingObserved, encode
from mer.router.dispatcher import ExpertDispatcher, ExpertStats
from mer.routing.space import RoutingDecision
from mer.routing.trace import TraceWriter


class DenseThread:
    """The router's single thread for dense compute; `await dense(f, *args)` never blocks the event loop."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-dense")

    async def __call__(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class GraphExperts:
    """The experts and observer of the router's forward passes (see the module docstring)."""

    def __init__(self, dispatcher: ExpertDispatcher, observe, log, *, num_moe_layers: int, prompt_length: int,
                 send_hidden: bool = False, trace: TraceWriter | None = None, record_hidden: bool = False,
                 log_blocks: bool = False):
        self.dispatcher = dispatcher
        self.observe = observe  # a PUSH socket to the predictor
        self.log = log
        self.num_moe_layers = num_moe_layers
        self.prompt_length = prompt_length
        self.send_hidden = send_hidden  # the gate predictor is on: it gets each token's residual too
        self.trace = trace
        self.record_hidden = record_hidden  # trace decisions keep their token's residual
        self.log_blocks = log_blocks
        self.observations = 0
        self.prefill = ExpertStats()
        self.decode = ExpertStats()
        self._decisions: list[RoutingDecision] = []  # of the pass, until its last MoE block is done
        self._block_stats = ExpertStats()

    async def __call__(self, moe_layer: int, batches: Mapping[int, np.ndarray], token: int) -> dict[int, np.ndarray]:
        outputs, self._block_stats = await self.dispatcher.run(moe_layer, token, batches)
        (self.decode if token >= self.prompt_length else self.prefill).add(self._block_stats)
        return outputs

    async def routed(self, moe_layer: int, positions: np.ndarray, residual: np.ndarray, routing: Routing) -> None:
        for index, position in enumerate(positions):
            experts = [int(expert) for expert in routing.experts[index]]
            weights = [float(weight) for weight in routing.weights[index]]
            global_ids = [self.dispatcher.global_id(moe_layer, expert) for expert in experts]
            if self.send_hidden:
                await self.observe.send_multipart(encode(HiddenObserved(int(position), moe_layer, residual[index])))
            await self.observe.send_multipart(encode(RoutingObserved(int(position), moe_layer, global_ids, weights)))
            self.observations += 1
            if self.trace is not None:
                hidden = residual[index].copy() if self.record_hidden else None
                self._decisions.append(RoutingDecision(int(position), moe_layer, tuple(experts), tuple(weights), hidden))

    async def block_done(self, costs: MoEBlockCosts) -> None:
        stats = self._block_stats
        if self.log_blocks:
            self.log.info("moe_block_done", token=int(costs.positions[-1]), tokens=len(costs.positions),
                          block=costs.block, moe_layer=costs.moe_layer, experts=costs.num_experts,
                          dense_us=costs.dense_us, expert_us=costs.expert_us,
                          io_wait_us=stats.io_wait_us, compute_us=stats.compute_us,  # unrounded: sums agree
                          hits=stats.hits, misses=stats.misses, prefetch_joins=stats.prefetch_joins,
                          chunks=stats.chunks)
        if self.trace is not None and costs.moe_layer == self.num_moe_layers - 1:  # token-major, as a trace is read
            for decision in sorted(self._decisions, key=lambda decision: (decision.token, decision.layer)):
                await self.trace.awrite(decision)
            self._decisions.clear()
