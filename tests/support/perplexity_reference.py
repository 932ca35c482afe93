"""llama.cpp's perplexity, written out again for the tests from llama-perplexity's rules (tools/perplexity/
perplexity.cpp, `perplexity()`), over llama.cpp's own logits (llama-cpp-python, `logits_all`).

Independent of `mer.model.perplexity`: the tokens come from llama.cpp's tokenizer (`Llama.tokenize`
with BOS as the vocabulary says, specials not parsed: what `common_tokenize(ctx, text, true)` does),
each chunk is evaluated by llama.cpp from an empty cache with BOS as its first token when the
vocabulary adds one, and the log-softmax is computed as llama-perplexity does (float32 max and
differences, float64 sum of exp) and summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tests.support.llama_reference import open_llama


@dataclass(frozen=True)
class ReferencePerplexity:
    tokens: int  # the text's tokens
    chunks: int
    running: list[float]  # exp(nll / count) after each chunk
    ppl: float
    ppl_error: float


def llama_log_softmax(row: np.ndarray, target: int) -> float:
    """log softmax(row)[target] the way llama-perplexity's `log_softmax` computes it."""
    row = np.asarray(row, np.float32)
    max_logit = row.max()
    sum_exp = float(np.exp((row - max_logit).astype(np.float32), dtype=np.float32).astype(np.float64).sum())
    return float(row[target] - max_logit) - math.log(sum_exp)


def llama_perplexity(model_path, text: str, context: int, max_chunks: int | None = None) -> ReferencePerplexity:
    """llama-perplexity's result for `text` with chunks of `context` tokens (at most `max_chunks`)."""
    import llama_cpp

    llm = open_llama(model_path, n_ctx=context)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    bos = llm.token_bos()
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=bool(add_bos), special=False)
    assert len(tokens) >= 2 * context, f"the text has {len(tokens)} tokens, fewer than 2 x {context}"
    chunks = len(tokens) // context if max_chunks is None else min(max_chunks, len(tokens) // context)
    first = context // 2
    nll = nll2 = 0.0
    count = 0
    running = []
    for chunk in range(chunks):
        ids = list(tokens[chunk * context : (chunk + 1) * context])
        if add_bos:
            ids[0] = bos
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: context], np.float32)
        for position in range(first, context - 1):
            value = -llama_log_softmax(scores[position], tokens[chunk * context + position + 1])
            nll += value
            nll2 += value * value
            count += 1
        running.append(math.exp(nll / count))
    mean, mean2 = nll / count, nll2 / count
    ppl = math.exp(mean)
    return ReferencePerplexity(len(tokens), chunks, running, ppl, math.sqrt((mean2 - mean * mean) / (count - 1)) * ppl)
