"""THE generation loop: prefill the prompt, then decode one token at a time.

The prompt runs as one batch (expert-major in every MoE block; a prompt longer than `prefill_chunk`
in consecutive passes of that many tokens), then each new token runs alone with the KV cache. The stop rules: after `max_tokens` tokens, on an end-of-generation token
(unless `ignore_eos`; the token is kept in the output), or when the context is full. An empty
prompt, one longer than the context or a bad `max_tokens` is refused.

`generate_tokens(forward_pass, ...)` runs the loop with any `ForwardPass` (the router's: experts
through the graph, dense steps in its thread, `on_token` streaming each token); `generate(model,
..., expert_fn)` runs it in one process.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from mer.errors import ConfigError, ContextLengthError
from mer.model.experts import ExpertFn
from mer.model.forward import ForwardCosts, ForwardPass, in_process, run_inline
from mer.model.model import MoEModel
from mer.model.moe import Routing
from mer.model.sampling import Sampler

STOP_MAX_TOKENS, STOP_END_OF_GENERATION, STOP_CONTEXT = "max_tokens", "end_of_generation", "context"


@dataclass
class GenerationResult:
    """The generated tokens and how the run went."""

    prompt_tokens: list[int]
    tokens: list[int]  # generated only, the end-of-generation token included when it stopped on one
    stop_reason: str
    prefill_seconds: float
    decode_seconds: float  # from the end of the prefill to the end (the decode steps and every sampling)
    t_prefill_start: float = 0.0  # CLOCK_MONOTONIC seconds (the clock of the log's t_mono)
    t_prefill_end: float = 0.0  # also the decode's start
    t_end: float = 0.0
    step_logits: list[np.ndarray] = field(default_factory=list)  # logits each token was chosen from (keep_logits)
    routings: list[dict[int, Routing]] = field(default_factory=list)  # per pass: prefill, then each step (keep_routings)
    decode_steps: int = 0  # passes after the prefill
    decode_costs: ForwardCosts = field(default_factory=ForwardCosts)  # summed over the decode steps


async def generate_tokens(
    forward_pass: ForwardPass,
    prompt_ids: Sequence[int],
    max_tokens: int,
    sampler: Sampler,
    *,
    end_ids: Collection[int] = (),
    ignore_eos: bool = False,
    keep_logits: bool = False,
    keep_routings: bool = True,
    on_token: Callable[[int, int], Awaitable[None]] | None = None,
    on_prefill: Callable[[GenerationResult], Awaitable[None]] | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Generate up to `max_tokens` tokens after `prompt_ids` (used exactly as given);
    `await on_token(index, token)` as each token is chosen, `await on_prefill(result)` once the prompt
    has run (its `t_prefill_*` set). The prompt runs in passes of at most `prefill_chunk` tokens
    (None: one pass). Times are `time.monotonic()`, durations their differences."""
    model, dense = forward_pass.model, forward_pass.dense
    prompt = [int(token) for token in prompt_ids]
    context = model.hparams.context_length
    if not prompt:
        raise ContextLengthError("the prompt is empty: generation needs at least one token")
    if len(prompt) > context:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens, the model's context is {context}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ConfigError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    kv_cache = await dense(model.new_kv_cache, min(context, len(prompt) + max_tokens) or 1)
    result = GenerationResult(prompt, [], STOP_MAX_TOKENS, 0.0, 0.0)
    result.t_prefill_start = time.monotonic()
    for chunk in prompt_chunks(prompt, prefill_chunk):
        step = await forward_pass(chunk, kv_cache, all_logits=False)
    result.t_prefill_end = time.monotonic()
    result.prefill_seconds = result.t_prefill_end - result.t_prefill_start
    if on_prefill is not None:
        await on_prefill(result)
    while len(result.tokens) < max_tokens:
        if keep_routings:
            result.routings.append(step.routings)
        logits = step.logits[-1]
        token = await dense(sampler.sample, logits)
        result.tokens.append(token)
        if keep_logits:
            result.step_logits.append(logits)
        if on_token is not None:
            await on_token(len(result.tokens) - 1, token)
        if token in end_ids and not ignore_eos:
            result.stop_reason = STOP_END_OF_GENERATION
            break
        if len(result.tokens) == max_tokens:
            break
        if kv_cache.length >= kv_cache.capacity:
            result.stop_reason = STOP_CONTEXT
            break
        step = await forward_pass([token], kv_cache, all_logits=False)
        result.decode_costs.add(step.costs)
        result.decode_steps += 1
    result.t_end = time.monotonic()
    result.decode_seconds = result.t_end - result.t_prefill_end
    return result


def prompt_chunks(prompt: Sequence[int], prefill_chunk: int | None) -> list[list[int]]:
    """The prompt's prefill passes: consecutive pieces of at most `prefill_chunk` tokens (None: the whole)."""
    size = len(prompt) if prefill_chunk is None else prefill_chunk
    return [list(prompt[start : start + size]) for start in range(0, len(prompt), max(size, 1))]


def generate(
    model: MoEModel,
    prompt_ids: Sequence[int],
    max_tokens: int,
    sampler: Sampler,
    expert_fn: ExpertFn,
    *,
    end_ids: Collection[int] = (),
    ignore_eos: bool = False,
    keep_logits: bool = False,
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """The loop in one process (dense steps inline, experts from `expert_fn`); `on_token(token)` as each comes."""

    async def stream(index: int, token: int) -> None:
        on_token(token)

    return run_inline(generate_tokens(ForwardPass(model, in_process(expert_fn)), prompt_ids, max_tokens, sampler,
                                      end_ids=end_ids, ignore_eos=ignore_eos, keep_logits=keep_logits,
                                      on_token=None if on_token is None else stream, prefill_chunk=prefill_chunk))
