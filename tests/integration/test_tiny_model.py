"""The shipped tiny MoE model (`mer/models/tiny-moe-q8_0.gguf`, docs/tiny-model.md).

- it is the only GGUF in `mer/models`, under 20 MB, and mer loads it as a Mixtral-style `llama` MoE
  (6 blocks, 8 experts top-2, q8_0 matrices, f32 norms and router);
- mer's tokenizer gives exactly the ids the model was trained on (`tools/tiny_moe_data.encode`) for
  texts with spaces, tabs, newlines, non-ASCII and real held-out stdlib source;
- on fixed held-out windows (files never trained on), mer's forward pass of the q8_0 model costs at
  least `MIN_GAIN_OVER_UNIGRAM` bits per byte less than a unigram model of (a tenth of) the training
  files' tokens (measured 1.482 against 3.590; the card's 16 windows: 1.174 against 3.131);
- routing over those windows uses every expert of every layer, neither collapsed (entropy >= 2 bits)
  nor one fixed pair (>= 10 distinct expert pairs per layer);
- marked `llama`: llama.cpp loads it, tokenizes like mer, and greedy generation (EOS ignored) from
  "def ", "import ", "class " gives the same 64 tokens in both; a difference names the step and both
  engines' top-2 logit margin there.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import TINY_MODEL_NAME, tiny_model_path
from mer.routing.trace import TraceHeader, TraceWriter
from tools.tiny_model_card import expert_usage_entropy, window_bits
from tools.tiny_moe_data import (
    encode, held_out_windows, read_text, split_files, token_byte_counts, unigram_log2_probabilities)

STEPS = 64
PROMPTS = ("def ", "import ", "class ")
TEXTS = ["def f(x):\n\treturn x  + 1\n", "hello  world\tand\ttabs\nnew\n\nlines", "héllo wörld — ☃ 日本語 🙂",
         "  two leading", "trailing spaces   ", "\t\n", "", "a\u2581b", "<s>not special</s>", "\r\n\x00\x7f"]
MIN_GAIN_OVER_UNIGRAM = 2.0  # bits per byte


@pytest.fixture(scope="module")
def model() -> MoEModel:
    return MoEModel.load(tiny_model_path())


def test_the_tiny_model_is_the_only_gguf_shipped():
    path = tiny_model_path()
    assert sorted(p.name for p in path.parent.glob("*.gguf")) == [TINY_MODEL_NAME]
    assert path.stat().st_size < 20 * 2**20


def test_mer_loads_it_as_a_mixtral_style_moe(model):
    hparams = model.hparams
    assert (hparams.num_blocks, hparams.num_experts, hparams.top_k) == (6, 8, 2)
    assert hparams.num_kv_heads < hparams.num_heads  # grouped-query attention
    assert sorted(model.moe_layers) == list(range(6))
    types = {tensor.name: tensor.tensor_type.name for tensor in model.source.parts[0].reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_norm.weight"] == "F32"


def test_tokenizer_gives_the_training_ids(model):
    tokenizer = load_tokenizer(model.source.parts[0])
    held_out = split_files()[1]
    samples = TEXTS + [read_text(path)[:3000] for path in held_out[:3]]
    for text in samples:
        ids = tokenizer.encode(text, add_special=False)
        assert ids == encode(text).tolist(), text[:80]
        assert tokenizer.decode(ids) == text.replace("\u2581", " "), text[:80]
    assert tokenizer.encode("def ") == [1, *encode("def ").tolist()]  # BOS, no EOS


def test_held_out_loss_is_well_below_a_unigram_model_and_routing_is_spread(model, tmp_path):
    windows = held_out_windows(2, 256)
    unigram = unigram_log2_probabilities(split_files()[0][::10])
    text_bytes = int(token_byte_counts()[windows[:, 1:]].sum())
    unigram_bits = float(-unigram[windows[:, 1:]].sum()) / text_bytes
    trace_path = tmp_path / "routing.jsonl"
    with TraceWriter(trace_path, TraceHeader(6, 8, 2)) as trace:
        model_bits = float(np.concatenate([window_bits(model, window, trace, index * 256)
                                           for index, window in enumerate(windows)]).sum()) / text_bytes
    print(f"held-out: model {model_bits:.3f} bits/byte, unigram {unigram_bits:.3f}")
    assert model_bits <= unigram_bits - MIN_GAIN_OVER_UNIGRAM, (model_bits, unigram_bits)
    entropies = expert_usage_entropy(trace_path)
    print("expert-usage entropy per layer:", [round(value, 3) for value in entropies])
    assert all(2.0 <= value <= 3.0 for value in entropies), entropies


def test_routing_is_token_dependent(model):
    window = held_out_windows(1, 256)[0]
    result = forward(model, window, model.new_kv_cache(256), GGUFExperts(model.source))
    for block, routing in result.routings.items():
        experts = np.sort(routing.experts, axis=1)
        assert len(np.unique(experts.ravel())) == 8, block
        assert len({tuple(pair) for pair in experts.tolist()}) >= 10, block


@pytest.mark.llama
def test_llama_cpp_tokenizes_like_mer(model):
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import open_llama

    llm = open_llama(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    for text in TEXTS:
        for add_special, parse_special in ((True, False), (False, False), (True, True)):
            expected = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
            assert tokenizer.encode(text, add_special, parse_special) == expected, (text, add_special, parse_special)
        ids = tokenizer.encode(text, add_special=False)
        assert b"".join(tokenizer.token_bytes(token) for token in ids) == llm.detokenize(ids), text


def margin(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@pytest.mark.llama
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_llama_cpp(model, prompt):
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import llama_greedy, open_llama

    llm = open_llama(tiny_model_path())
    prompt_ids = load_tokenizer(model.source.parts[0]).encode(prompt)
    theirs_tokens, theirs = llama_greedy(llm, prompt_ids, STEPS)
    result = generate(model, prompt_ids, STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True,
                      keep_logits=True)
    ours = np.stack(result.step_logits)
    differing = [step for step, (a, b) in enumerate(zip(result.tokens, theirs_tokens)) if a != b]
    assert not differing, (
        f"greedy tokens differ at step {differing[0]}: mer {result.tokens[differing[0]]} vs llama.cpp "
        f"{theirs_tokens[differing[0]]}; top-2 logit margin there: mer {margin(ours[differing[0]]):.3e}, "
        f"llama.cpp {margin(theirs[differing[0]]):.3e}")
    errors = np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1)
    print(f"{prompt!r}: {STEPS} tokens identical; relative logit error max {errors.max():.2e}; smallest top-2 "
          f"margin {min(margin(row) for row in theirs):.3e}")
    assert errors.max() <= 2e-2  # q8_0, as in test_llama_parity
    assert len(set(result.tokens)) >= 4, "a degenerate continuation is a weak comparison"


def test_export_writes_what_torch_computes(tmp_path):
    """A (random) model of the training tool, exported in f32, gives torch's logits in mer to 1e-5 of the
    largest logit (measured ~1e-6): the GGUF's names, layouts, RoPE pairing and gating are those the
    tool trains with. (q8_0 exports of random weights are not comparable: near-tied routers flip.)"""
    torch = pytest.importorskip("torch")
    import argparse

    from tools.export_tiny_moe import export
    from tools.train_tiny_moe import TinyMoE, TinyMoEConfig, save_checkpoint

    torch.manual_seed(1)
    config = TinyMoEConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2, d_ff=64, context=64)
    network = TinyMoE(config)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(4.0 if parameter.dim() >= 2 else 1.0)  # larger weights: logits far from uniform
    save_checkpoint(tmp_path / "model.pt", network, argparse.Namespace(steps=0, seed=1), [{"step": 0}])
    export(tmp_path / "model.pt", tmp_path / "model.gguf", "f32")
    ids = encode("def export(path):\n\treturn path.name  # ok\n")[:48].astype(np.int64)
    with torch.no_grad():
        expected = network.eval()(torch.from_numpy(ids[None]))[0][0].numpy()
    exported = MoEModel.load(tmp_path / "model.gguf")
    ours = forward(exported, ids, exported.new_kv_cache(len(ids)), GGUFExperts(exported.source)).logits
    relative = np.abs(ours - expected).max(axis=1) / np.abs(expected).max(axis=1)
    assert relative.max() <= 1e-5, relative.max()
