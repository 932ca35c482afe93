"""Perplexity of a text, as llama.cpp's `llama-perplexity` computes it (its default mode, no stride).

The rules (llama.cpp's tools/perplexity/perplexity.cpp, `perplexity()`):

- the text is tokenized once, with BOS first when the vocabulary adds it (no special tokens parsed);
  it must give at least `2 x context` tokens;
- it is cut into `len(tokens) // context` chunks of `context` consecutive tokens (at most `--chunks`
  of them), the rest is dropped; each chunk runs alone, from an empty KV cache, and when the vocabulary
  adds BOS the chunk's first token is replaced by BOS;
- only the second half of each chunk is scored: with `first = context // 2`, the logits at positions
  `first .. context - 2` predict the chunk's tokens `first + 1 .. context - 1` (the original tokens),
  `context - first - 1` per chunk; `nll` is the sum of -log softmax(logits)[target], `nll2` the sum
  of its squares;
- after each chunk the running value is `exp(nll / count)` over every token scored so far; the final
  value is `PPL = exp(mean)` with the error `PPL x sqrt((mean(nll^2) - mean^2) / (count - 1))`
  (the standard error of the mean negative log-likelihood, carried through exp).

`plan_perplexity` checks the tokens and the context and gives the `PerplexityPlan`;
`perplexity_passes(forward_pass, plan, ...)` runs every chunk through any `ForwardPass` (the
router's, through the graph; expert-major passes of at most `prefill_chunk` tokens, logits computed
only for the passes that reach the scored half) and `perplexity(model, plan, expert_fn)` does the
same in one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mer.errors import ConfigError, ContextLengthError
from mer.model.experts import ExpertFn
from mer.model.forward import ForwardPass, in_process, run_inline
from mer.model.generate import prompt_chunks
from mer.model.model import MoEModel

MIN_CONTEXT = 4  # the smallest context whose chunks score a token (context - context // 2 - 1 >= 1)


@dataclass(frozen=True)
class PerplexityPlan:
    """What runs: the text's tokens, the chunk length (`context`), how many chunks, and the BOS id that
    replaces each chunk's first token (None: the vocabulary adds no BOS)."""

    tokens: Sequence[int]
    context: int
    num_chunks: int
    bos_id: int | None

    @property
    def first(self) -> int:
        """The first scored position of a chunk (its logits predict the token after it)."""
        return self.context // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.context - self.first - 1

    def chunk_ids(self, chunk: int) -> list[int]:
        """The ids that run for `chunk`: its `context` tokens, the first replaced by BOS when one is added."""
        start = chunk * self.context
        ids = [int(token) for token in self.tokens[start : start + self.context]]
        if self.bos_id is not None:
            ids[0] = self.bos_id
        return ids

    def chunk_targets(self, chunk: int) -> np.ndarray:
        """The tokens the scored logits of `chunk` predict (the text's own, never the BOS replacement)."""
        start = chunk * self.context
        return np.asarray(self.tokens[start + self.first + 1 : start + self.context], np.int64)


def plan_perplexity(tokens: Sequence[int], context: int, *, max_chunks: int | None, bos_id: int | None,
                    model_context: int, source: str = "the text") -> PerplexityPlan:
    """The plan of a perplexity run over `tokens` (see the module docstring), or a clear error: a context
    below `MIN_CONTEXT` or above the model's, fewer than `2 x context` tokens, `max_chunks` below 1."""
    if isinstance(context, bool) or not isinstance(context, int) or context < MIN_CONTEXT:
        raise ConfigError(f"--ctx {context!r}: a perplexity chunk needs at least {MIN_CONTEXT} tokens (the second "
                          f"half of each chunk is scored)")
    if context > model_context:
        raise ContextLengthError(f"--ctx {context} is larger than the model's context of {model_context} tokens: "
                                 f"give --ctx {model_context} or less")
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
        raise ConfigError(f"--chunks {max_chunks!r}: must be an integer >= 1")
    if len(tokens) < 2 * context:
        raise ContextLengthError(f"{source} tokenizes to {len(tokens)} tokens: perplexity with a context of "
                                 f"{context} needs at least {2 * context} (2 x --ctx), as llama-perplexity does; "
                                 f"give a longer text or a smaller --ctx")
    available = len(tokens) // context
    return PerplexityPlan(tokens, context, available if max_chunks is None else min(max_chunks, available), bos_id)


NLL_BLOCK_ROWS = 32  # rows converted to float64 at a time (a 150k vocabulary: 39 MB)


def token_nlls(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64 (max subtracted first)."""
    nlls = np.empty(len(targets), np.float64)
    for start in range(0, len(targets), NLL_BLOCK_ROWS):
        rows = np.asarray(logits[start : start + NLL_BLOCK_ROWS], np.float64)
        shifted = rows - rows.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=1))
        nlls[start : start + len(rows)] = log_sum - shifted[np.arange(len(rows)), targets[start : start + len(rows)]]
    return nlls


@dataclass(frozen=True)
class ChunkScore:
    """One chunk's scored tokens: how many, the sums of their nll and nll^2, and the seconds it ran."""

    chunk: int  # 0-based
    count: int
    nll: float
    nll2: float
    seconds: float

    @property
    def ppl(self) -> float:
        """The chunk's own perplexity (its scored half alone)."""
        return math.exp(self.nll / self.count)


@dataclass
class PerplexityTally:
    """The running sums over the chunks scored so far."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    chunks: list[ChunkScore] = field(default_factory=list)
    running: list[float] = field(default_factory=list)  # exp(nll / count) after each chunk

    def add(self, score: ChunkScore) -> float:
        """Count a chunk; the running perplexity after it."""
        self.count += score.count
        self.nll += score.nll
        self.nll2 += score.nll2
        self.chunks.append(score)
        self.running.append(math.exp(self.nll / self.count))
        return self.running[-1]

    @property
    def mean_nll(self) -> float:
        return self.nll / self.count

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def ppl_error(self) -> float | None:
        """The final value's ± (llama-perplexity's): None when it is undefined (one token scored, or no
        variance), where llama-perplexity says "Unexpected negative standard deviation"."""
        mean = self.mean_nll
        variance = self.nll2 / self.count - mean * mean
        if self.count < 2 or not variance > 0:
            return None
        return math.sqrt(variance / (self.count - 1)) * self.ppl


@dataclass
class PerplexityResult:
    """A finished run: its plan, the tally, and the seconds the chunks took."""

    plan: PerplexityPlan
    tally: PerplexityTally
    seconds: float


async def score_chunk(forward_pass: ForwardPass, plan: PerplexityPlan, chunk: int,
                      prefill_chunk: int | None) -> ChunkScore:
    """Run one chunk from an empty KV cache and score its second half."""
    started = time.monotonic()
    model = forward_pass.model
    kv_cache = await forward_pass.dense(model.new_kv_cache, plan.context)
    rows, position = [], 0
    for piece in prompt_chunks(plan.chunk_ids(chunk), prefill_chunk):
        end = position + len(piece)
        reaches_scored_half = end > plan.first
        step = await forward_pass(piece, kv_cache, all_logits=reaches_scored_half)
        if reaches_scored_half:
            keep = max(plan.first - position, 0)
            rows.append(step.logits[keep:])
        position = end
    logits = np.concatenate(rows)[: plan.scored_per_chunk]  # positions first .. context - 2
    nlls = await forward_pass.dense(token_nlls, logits, plan.chunk_targets(chunk))
    return ChunkScore(chunk, len(nlls), float(math.fsum(nlls)), float(math.fsum(nlls * nlls)),
                      time.monotonic() - started)


async def perplexity_passes(forward_pass: ForwardPass, plan: PerplexityPlan, *, prefill_chunk: int | None = None,
                            on_chunk: Callable[[ChunkScore, float], Awaitable[None]] | None = None
                            ) -> PerplexityResult:
    """Score every chunk of `plan` in order; `await on_chunk(score, running_ppl)` after each."""
    tally = PerplexityTally()
    started = time.monotonic()
    for chunk in range(plan.num_chunks):
        score = await score_chunk(forward_pass, plan, chunk, prefill_chunk)
        running = tally.add(score)
        if on_chunk is not None:
            await on_chunk(score, running)
    return PerplexityResult(plan, tally, time.monotonic() - started)


def perplexity(model: MoEModel, plan: PerplexityPlan, expert_fn: ExpertFn, *,
               prefill_chunk: int | None = None) -> PerplexityResult:
    """The run in one process (dense steps inline, experts from `expert_fn`)."""
    return run_inline(perplexity_passes(ForwardPass(model, in_process(expert_fn)), plan, prefill_chunk=prefill_chunk))
