"""Held-out bits per byte of a GGUF on fixed windows, in two scorings and two engines (docs/tiny-model.md).

- whole window (the card's first measure): each window runs as it is (its own first token, no BOS put
  in), and every next-token prediction in it is scored: positions 0 .. L-2 predict tokens 1 .. L-1;
- second half, as llama-perplexity scores (`mer.model.perplexity`): each window is a chunk whose
  first token is replaced by BOS, run from an empty KV cache, and only the logits at positions
  L/2 .. L-2 are scored (predicting the window's own tokens L/2+1 .. L-1), so every scored token
  has at least L/2 tokens of context. mer's side is `mer.model.perplexity.perplexity` (the code of
  `mer-pipeline perplexity`, in one process); llama.cpp's (llama-cpp-python, logits for every
  position, f32 KV cache, one thread) evaluates the same ids and takes the log-softmax the way
  llama-perplexity does (`tests/support/perplexity_reference.llama_log_softmax`).

Bits per byte = (sum of the scored tokens' negative log-likelihoods in nats) / ln 2 / (the bytes those
tokens stand for, `Tokenizer.token_bytes`): in the tiny model's vocabulary (tools/tiny_moe_data.py) a
byte token is one byte, a piece its characters' UTF-8 bytes (U+2581 a space), BOS / EOS none; a file
boundary (EOS, BOS) inside a window costs bits but adds no byte.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mer.model.experts import GGUFExperts
from mer.model.model import MoEModel
from mer.model.perplexity import PerplexityPlan, perplexity
from mer.model.tokenizer import Tokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.support (llama.cpp)


@dataclass(frozen=True)
class HeldOutScore:
    """Scored tokens: their negative log-likelihood summed (nats), how many, and the bytes they stand for."""

    nll_nats: float
    tokens: int
    text_bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.text_bytes

    @property
    def bits_per_token(self) -> float:
        return self.nll_nats / math.log(2) / self.tokens

    def to_json_dict(self) -> dict:
        return {"bits_per_byte": self.bits_per_byte, "bits_per_token": self.bits_per_token,
                "nll_nats": self.nll_nats, "tokens": self.tokens, "bytes": self.text_bytes}


def token_byte_counts(tokenizer: Tokenizer) -> np.ndarray:
    """How many bytes of text each token id stands for (control tokens such as BOS / EOS: 0)."""
    return np.array([len(tokenizer.token_bytes(token)) for token in range(tokenizer.vocab_size)], np.int64)


def score_of(nlls: np.ndarray, targets: np.ndarray, byte_counts: np.ndarray) -> HeldOutScore:
    """The `HeldOutScore` of per-token negative log-likelihoods (nats) of the `targets` they predict."""
    text_bytes = int(byte_counts[targets].sum())
    if text_bytes == 0:
        raise ValueError(f"the {len(targets)} scored tokens stand for no byte of text: no bits per byte")
    return HeldOutScore(float(math.fsum(nlls)), len(targets), text_bytes)


def window_plan(windows: np.ndarray, bos_id: int | None) -> PerplexityPlan:
    """The llama-perplexity plan whose chunks are exactly `windows` [count, length] (first token -> BOS)."""
    count, length = windows.shape
    return PerplexityPlan(windows.reshape(-1).tolist(), length, count, bos_id)


def plan_targets(plan: PerplexityPlan) -> np.ndarray:
    """Every token the plan's scored logits predict, chunk after chunk."""
    return np.concatenate([plan.chunk_targets(chunk) for chunk in range(plan.num_chunks)])


def bos_of(tokenizer: Tokenizer) -> int | None:
    """The id llama-perplexity puts first in each chunk: BOS when the vocabulary adds it, else none."""
    return tokenizer.bos_id if tokenizer.add_bos else None


def mer_second_half(model: MoEModel, windows: np.ndarray) -> HeldOutScore:
    """mer's llama-perplexity score of `windows` (`mer.model.perplexity.perplexity`, experts from the GGUF)."""
    tokenizer = load_tokenizer(model.source.parts[0])
    plan = window_plan(windows, bos_of(tokenizer))
    result = perplexity(model, plan, GGUFExperts(model.source))
    targets = plan_targets(plan)
    if result.tally.count != len(targets):
        raise AssertionError(f"mer scored {result.tally.count} tokens, the plan has {len(targets)} targets")
    text_bytes = int(token_byte_counts(tokenizer)[targets].sum())
    return HeldOutScore(result.tally.nll, result.tally.count, text_bytes)


def llama_second_half(model_path: Path, windows: np.ndarray, byte_counts: np.ndarray) -> HeldOutScore:
    """llama.cpp's llama-perplexity score of the same windows (same ids, BOS first when the vocabulary adds it)."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama.cpp's scoring needs llama-cpp-python (pip install -e '.[parity]'); --no-llama "
                         "skips it") from None

    from tests.support.llama_reference import open_llama
    from tests.support.perplexity_reference import llama_log_softmax

    count, length = windows.shape
    llm = open_llama(model_path, n_ctx=length)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    plan = window_plan(windows, llm.token_bos() if add_bos else None)
    nlls = []
    for chunk in range(plan.num_chunks):
        llm.reset()
        llm.eval(plan.chunk_ids(chunk))
        scores = np.asarray(llm.scores[:length], np.float32)
        targets = plan.chunk_targets(chunk)
        nlls += [-llama_log_softmax(scores[plan.first + index], int(target)) for index, target in enumerate(targets)]
    return score_of(np.array(nlls), plan_targets(plan), byte_counts)


def whole_window_nlls(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Negative log-likelihoods (nats, float64) of each next token of `window` under `logits` [len, vocab]."""
    rows = logits[:-1].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_normaliser = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    return log_normaliser - rows[np.arange(len(window) - 1), window[1:]]
