"""THE forward pass over a batch of new tokens (a prompt or one decode step), wherever its parts run.

Each block: attention with the KV cache, then the FFN: for a MoE block the tokens are routed,
grouped by expert (expert-major: a prompt needs each chosen expert once per block), the block's
groups are handed to the experts in ONE call, and the outputs are summed with the gate weights
(plus, for qwen2moe, the block's shared expert, computed with the dense steps: it is resident).

`ForwardPass(model, experts, dense, observer)` says where the parts run: `await experts(moe_layer,
batches, token)` -> `{expert: out}` (`token`: the position of the pass's last token); `await
dense(function, *args)`, `inline` or the router's dense thread; the optional `observer` is told of
each MoE block's routing and residual before its experts run and of its costs after.
`forward(model, ids, cache, expert_fn)` runs the same steps inline with a synchronous `ExpertFn`
(docs/model.md), so the two give identical numbers.

`ForwardPass.step(segments)` runs the new tokens of several sequences (each a `Segment`: its ids and
its own KV cache) as ONE pass: attention per sequence over its own cache, everything else on the
rows of all of them together, so each MoE block groups the tokens of every sequence by expert and
hands each chosen expert its rows in one batch (serving's continuous batching, docs/serving.md).
Every kernel computes a row with the same bits whatever else is in its batch
(`tests/unit/test_batch_invariance.py`), so a sequence's logits do not depend on its companions.
Logits that hold NaN or inf end the pass with `NonFiniteError` (never sampled from).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from mer.errors import NonFiniteError
from mer.model.attention import KVCache, next_positions
from mer.model.experts import ExpertFn
from mer.model.model import MoEModel
from mer.model.moe import Routing, combine_experts, expert_batches, group_by_expert
from mer.model.shared_expert import add_shared_expert

Experts = Callable[[int, Mapping[int, np.ndarray], int], Awaitable[dict[int, np.ndarray]]]
DenseRunner = Callable[..., Awaitable[Any]]
Result = TypeVar("Result")


async def inline(function: Callable[..., Result], *args: Any) -> Result:
    """Run a dense step where the pass runs (in one process)."""
    return function(*args)


def in_process(expert_fn: ExpertFn) -> Experts:
    """The async expert function of a synchronous `ExpertFn`."""

    async def experts(moe_layer: int, batches: Mapping[int, np.ndarray], token: int) -> dict[int, np.ndarray]:
        return expert_fn(moe_layer, batches)

    return experts


def run_inline(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """The result of a coroutine that never waits (inline dense steps, in-process experts), without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise RuntimeError("an in-process forward pass waited on something: run it in an event loop instead")


@dataclass(frozen=True)
class MoEBlockCosts:
    """One MoE block of a pass: where, how many experts, and its dense and expert microseconds."""

    block: int
    moe_layer: int
    positions: np.ndarray  # the pass's positions
    num_experts: int  # distinct experts of the block
    dense_us: float  # attention, norms, gate, grouping and combine (thread hand-offs included)
    expert_us: float  # the experts' call


class ForwardObserver(Protocol):
    """What the router learns from a pass (see the module docstring)."""

    async def routed(self, moe_layer: int, positions: np.ndarray, residual: np.ndarray, routing: Routing) -> None: ...

    async def block_done(self, costs: MoEBlockCosts) -> None: ...


@dataclass
class ForwardCosts:
    """Where one or more passes spent their time, in microseconds."""

    moe_blocks: int = 0
    dense_us: float = 0.0  # attention, norms, gate, grouping and combine of the MoE blocks
    expert_us: float = 0.0  # the experts' calls
    other_us: float = 0.0  # embedding, dense FFN blocks, LM head

    def add(self, other: "ForwardCosts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Segment:
    """One sequence's new tokens in a pass, continuing the sequence held in its KV cache."""

    token_ids: Sequence[int] | np.ndarray
    kv_cache: KVCache


@dataclass
class ForwardResult:
    """Logits float32 `[tokens, vocab]` (or one row per segment, its last token's, when not all were
    asked for), the routing of every MoE block by block index, and the pass's costs."""

    logits: np.ndarray
    routings: dict[int, Routing] = field(default_factory=dict)
    costs: ForwardCosts = field(default_factory=ForwardCosts)


def _elapsed_us(started: float) -> float:
    return (time.perf_counter() - started) * 1e6


def _block_front(model: MoEModel, block: int, hidden: np.ndarray, segments: Sequence[Segment], bounds: np.ndarray,
                 positions: np.ndarray):
    """Attention (each segment over its own KV cache) and ffn_norm, then the dense FFN, or the gate and
    the expert-major batches of every segment's rows together."""
    hidden = model.attention_blocks(block, hidden, [segment.kv_cache for segment in segments], bounds, positions)
    normed = model.ffn_input(block, hidden)
    if not model.is_moe_block(block):
        return hidden + model.dense_ffn(block, normed), None, None, None, None
    routing = model.route(block, normed)
    groups = group_by_expert(routing)
    return hidden, routing, groups, expert_batches(normed, groups), model.shared_expert(block, normed)


def finite_logits(model: MoEModel, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The logits of the rows `hidden` (at `positions`); NonFiniteError if one is NaN or inf (never sampled)."""
    logits = model.logits(hidden)
    finite = np.isfinite(logits).all(axis=-1)
    if not finite.all():
        position = int(positions[int(np.argmin(finite))])
        raise NonFiniteError(f"logits: NaN or inf at position {position} (the dense weights, or an expert's output "
                             "that was not caught, hold NaN or inf)")
    return logits


@dataclass
class ForwardPass:
    """A model's forward pass with its experts, dense runner and observer (see the module docstring)."""

    model: MoEModel
    experts: Experts
    dense: DenseRunner = inline
    observer: ForwardObserver | None = None

    async def __call__(self, token_ids: Sequence[int] | np.ndarray, kv_cache: KVCache, *,
                       all_logits: bool = True) -> ForwardResult:
        """Run new tokens (continuing the sequence in `kv_cache`) through the model."""
        return await self.step([Segment(token_ids, kv_cache)], all_logits=all_logits)

    async def step(self, segments: Sequence[Segment], *, all_logits: bool = False,
                   clock: int | None = None) -> ForwardResult:
        """Run the new tokens of several sequences as one pass (see the module docstring). The experts
        and the observer are told of `clock` for every token when it is given (a serving step's number:
        the positions of different sequences mean nothing to the I/O worker), else of the positions."""
        result = ForwardResult(np.empty(0, np.float32))
        started = time.perf_counter()
        hidden = await self.dense(self.model.embed, np.concatenate([np.asarray(s.token_ids, np.int64) for s in segments]))
        result.costs.other_us += _elapsed_us(started)
        bounds = np.concatenate([[0], np.cumsum([len(segment.token_ids) for segment in segments])])
        positions = np.concatenate([next_positions(segment.kv_cache, 0, len(segment.token_ids)) for segment in segments])
        for block in range(self.model.hparams.num_blocks):
            hidden = await self._block(block, hidden, segments, bounds, positions, result, clock)
        started = time.perf_counter()
        rows = slice(None) if all_logits else bounds[1:] - 1  # every row, or each sequence's last
        result.logits = await self.dense(finite_logits, self.model, hidden[rows], positions[rows])
        result.costs.other_us += _elapsed_us(started)
        return result

    async def _block(self, block: int, hidden: np.ndarray, segments: Sequence[Segment], bounds: np.ndarray,
                     positions: np.ndarray, result: ForwardResult, clock: int | None) -> np.ndarray:
        model, costs = self.model, result.costs
        started = time.perf_counter()
        hidden, routing, groups, batches, shared = await self.dense(_block_front, model, block, hidden, segments,
                                                                    bounds, positions)
        dense_us = _elapsed_us(started)
        if routing is None:
            costs.other_us += dense_us
            return hidden
        moe_layer = model.moe_layers[block]
        tokens = positions if clock is None else np.full(positions.size, clock)
        if self.observer is not None:
            await self.observer.routed(moe_layer, tokens, hidden, routing)
        started = time.perf_counter()
        outputs = await self.experts(moe_layer, batches, int(tokens[-1]))
        expert_us = _elapsed_us(started)
        started = time.perf_counter()
        hidden = await self.dense(lambda: hidden + add_shared_expert(
            combine_experts(routing, groups, outputs, model.hparams.d_model), shared))
        dense_us += _elapsed_us(started)
        costs.add(ForwardCosts(1, dense_us, expert_us))
        result.routings[block] = routing
        if self.observer is not None:
            await self.observer.block_done(
                MoEBlockCosts(block, moe_layer, tokens, len(batches), dense_us, expert_us))
        return hidden


def forward(model: MoEModel, token_ids: Sequence[int] | np.ndarray, kv_cache: KVCache, expert_fn: ExpertFn, *,
            all_logits: bool = True) -> ForwardResult:
    """The pass in one process: dense steps inline, experts from a synchronous `ExpertFn`."""
    return run_inline(ForwardPass(model, in_process(expert_fn))(token_ids, kv_cache, all_logits=all_logits))
