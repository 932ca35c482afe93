"""llama-perplexity's rules in `mer.model.perplexity`, checked against values computed here by hand
and against the float64 numpy forward pass (tests/support/reference_forward.py) in one process.

- the plan: `len(tokens) // ctx` chunks (at most `--chunks`), each chunk's first id replaced by BOS
  when the vocabulary adds one, the targets the text's own tokens of the second half; what
  llama-perplexity refuses (fewer than 2 x ctx tokens) and what mer refuses besides (ctx above the
  model's context, ctx below 4, chunks below 1) is an error naming the value;
- the arithmetic: uniform logits give exactly the vocabulary size (and no error estimate: no
  spread); the running values, the final value and its ± are llama-perplexity's formulas, recomputed
  here with numpy from the per-token nll;
- a tiny random f32 model: mer's perplexity equals the one computed from the float64 reference's
  logits with the same chunking to 1e-5 relative (measured ~1e-9), and running the chunks in
  passes of 24 tokens (chunked prefill) instead of one gives the same value to 1e-6;
- the shipped held-out text is whole stdlib files the tiny model's training held out, long enough
  for a default run (and, on the CPython it was written from, byte for byte those files).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mer.errors import ConfigError, ContextLengthError
from mer.model.experts import GGUFExperts
from mer.model.model import MoEModel
from mer.model.perplexity import (ChunkScore, PerplexityTally, perplexity, plan_perplexity, token_nlls)
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.reference_forward import ReferenceModel


def test_the_plan_cuts_whole_chunks_puts_bos_first_and_scores_the_text_tokens_of_the_second_half():
    tokens = [1, *range(10, 10 + 41)]  # 42 tokens: BOS then the text
    plan = plan_perplexity(tokens, 8, max_chunks=None, bos_id=1, model_context=64)
    assert (plan.num_chunks, plan.first, plan.scored_per_chunk) == (5, 4, 3)
    assert plan.chunk_ids(0) == tokens[0:8]
    assert plan.chunk_ids(2) == [1, *tokens[17:24]]  # first token replaced by BOS
    assert plan.chunk_targets(2).tolist() == tokens[21:24]  # positions 4..6 predict tokens 5..7
    assert plan_perplexity(tokens, 8, max_chunks=2, bos_id=1, model_context=64).num_chunks == 2
    assert plan_perplexity(tokens, 8, max_chunks=99, bos_id=1, model_context=64).num_chunks == 5
    without_bos = plan_perplexity(tokens, 8, max_chunks=None, bos_id=None, model_context=64)
    assert without_bos.chunk_ids(2) == tokens[16:24]


@pytest.mark.parametrize("length, context, chunks, model_context, message", [
    (15, 8, None, 64, "tokenizes to 15 tokens: perplexity with a context of 8 needs at least 16"),
    (100, 128, None, 64, "--ctx 128 is larger than the model's context of 64"),
    (100, 3, None, 64, "--ctx 3: a perplexity chunk needs at least 4 tokens"),
    (100, 8, 0, 64, "--chunks 0: must be an integer >= 1"),
])
def test_bad_plans_are_refused_naming_the_value(length, context, chunks, model_context, message):
    with pytest.raises((ConfigError, ContextLengthError), match=message.replace("(", r"\(")):
        plan_perplexity(list(range(length)), context, max_chunks=chunks, bos_id=None, model_context=model_context)


def test_uniform_logits_give_the_vocabulary_size_and_no_error_estimate():
    nlls = token_nlls(np.zeros((5, 37), np.float32), np.array([0, 3, 36, 7, 1]))
    tally = PerplexityTally()
    tally.add(ChunkScore(0, 5, float(nlls.sum()), float((nlls * nlls).sum()), 0.0))
    assert tally.ppl == pytest.approx(37.0, rel=1e-12)
    assert tally.ppl_error is None


def test_running_and_final_values_and_the_error_are_llama_perplexitys_formulas():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, size=(3, 6, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(3, 6))
    tally = PerplexityTally()
    every = []
    for chunk in range(3):
        nlls = token_nlls(logits[chunk], targets[chunk])
        # -log softmax by hand, in float64
        expected = [math.log(np.exp(logits[chunk, i].astype(np.float64)).sum()) - float(logits[chunk, i, targets[chunk, i]])
                    for i in range(6)]
        np.testing.assert_allclose(nlls, expected, rtol=1e-12)
        every += list(nlls)
        running = tally.add(ChunkScore(chunk, 6, float(nlls.sum()), float((nlls * nlls).sum()), 0.0))
        assert running == pytest.approx(math.exp(np.mean(every)), rel=1e-12)
    values = np.array(every)
    ppl = math.exp(values.mean())
    assert tally.ppl == pytest.approx(ppl, rel=1e-12)
    assert tally.ppl_error == pytest.approx(ppl * math.sqrt(values.var() / (len(values) - 1)), rel=1e-9)
    assert [score.ppl for score in tally.chunks] == pytest.approx(
        [math.exp(np.mean(every[6 * chunk : 6 * chunk + 6])) for chunk in range(3)], rel=1e-12)


def reference_perplexity(reference: ReferenceModel, tokens: list[int], context: int, chunks: int, bos: int) -> float:
    """exp(mean nll) of the second halves, from the float64 reference's logits of each chunk."""
    first, values = context // 2, []
    for chunk in range(chunks):
        ids = [bos, *tokens[chunk * context + 1 : (chunk + 1) * context]]
        logits = reference.logits(ids)
        for position in range(first, context - 1):
            row = logits[position]
            target = tokens[chunk * context + position + 1]
            values.append(math.log(np.exp(row - row.max()).sum()) + row.max() - row[target])
    return math.exp(np.mean(values))


def test_a_tiny_f32_model_matches_the_float64_reference_and_chunked_prefill_changes_nothing(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "f32.gguf", dtypes=("f32",) * 3, dense_dtype="f32", n_experts=8, top_k=2,
                               d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, vocab_size=384, seed=7)
    model = MoEModel.load(info.path)
    tokens = [1, *np.random.default_rng(2).integers(3, 384, size=200).tolist()]
    plan = plan_perplexity(tokens, 64, max_chunks=3, bos_id=1, model_context=model.hparams.context_length)
    whole = perplexity(model, plan, GGUFExperts(model.source))
    pieces = perplexity(model, plan, GGUFExperts(model.source), prefill_chunk=24)
    expected = reference_perplexity(ReferenceModel(info.path), tokens, 64, 3, 1)
    print(f"f32 model: mer {whole.tally.ppl:.6f}, float64 reference {expected:.6f}, "
          f"relative {abs(whole.tally.ppl / expected - 1):.2e}")
    assert whole.tally.count == 3 * 31
    assert whole.tally.ppl == pytest.approx(expected, rel=1e-5)
    assert pieces.tally.ppl == pytest.approx(whole.tally.ppl, rel=1e-6)


def test_token_nlls_of_many_rows_equal_the_row_by_row_values():
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 4, size=(100, 77)).astype(np.float32)  # more rows than one float64 block
    targets = rng.integers(0, 77, size=100)
    np.testing.assert_array_equal(token_nlls(logits, targets),
                                  np.concatenate([token_nlls(logits[i : i + 1], targets[i : i + 1]) for i in range(100)]))


def test_the_start_message_refuses_chunks_that_do_not_fit_the_tokens():
    from mer.protocol import StartPerplexity

    StartPerplexity("/m.gguf", list(range(16)), 8, 2, 1)
    with pytest.raises(ConfigError, match="3 chunks of 8 tokens do not fit 16 tokens"):
        StartPerplexity("/m.gguf", list(range(16)), 8, 3, 1)
    with pytest.raises(ConfigError, match="tokens must be token ids"):
        StartPerplexity("/m.gguf", [1, -2, *range(14)], 8, 2, 1)


def test_the_shipped_held_out_text_is_whole_held_out_stdlib_files_long_enough_for_the_default_run():
    import platform

    from mer.model.tokenizer import load_tokenizer
    from mer.models import held_out_text_path, tiny_model_path
    from mer.store.gguf_source import read_gguf_source
    from tools.tiny_moe_data import is_held_out, stdlib_root
    from tools.write_held_out_text import FILES, held_out_text

    assert all(is_held_out(name) for name in FILES)
    shipped = held_out_text_path().read_bytes()
    if platform.python_version() == "3.11.7":  # the standard library it was written from
        assert shipped == held_out_text(stdlib_root())
    tokenizer = load_tokenizer(read_gguf_source(tiny_model_path()).parts[0])
    tokens = tokenizer.encode(shipped.decode("utf-8"))
    assert tokens[0] == tokenizer.bos_id and len(tokens) // 256 >= 64  # chunks of the model's context: enough to judge
