"""gpt-oss against llama.cpp (llama-cpp-python 0.3.36), on tiny random models from `tests/support/gpt_oss_models.py`.

Two models of 2 blocks (block 0 slides with a window of 8 positions, block 1 sees all), 8 experts
top-2, d_model 64, 4 heads of 32 (q width 128), YaRN factor 4 over an original context of 64:
"mxfp4" (MXFP4 experts, q8_0 embedding/attention/head, as real gpt-oss files) and "f32". Checked:

- single process: 64 greedy tokens identical to llama.cpp's, and the logits per step within
  (largest difference / largest llama.cpp logit) 1e-4 for f32 and 2e-2 for mxfp4 (measured
  5.7e-7 and 1.8e-7: mer rounds the inputs of q8_0 and MXFP4 matmuls to q8_0 as ggml does); the
  prompt plus 64 tokens pass the window many times over, and routing reaches most experts;
- through the process graph (`mer-pipeline generate`: implicit conversion to a store, 4 cache slots
  for 16 experts, compute workers on the MXFP4 payloads with their biases, the gate predictor
  hinting from gpt-oss's biased router): the same 64 tokens;
- the tokenizer (o200k pre-tokenizer "gpt-4o", the harmony tokens llama.cpp always parses) gives
  llama.cpp's ids on texts with spaces, digits, punctuation, non-ASCII and special tokens, and the
  chat template the GGUF carries renders into ids llama.cpp parses the same way;
- a missing key or an unsupported one is refused with its name.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import UnsupportedModelError
from mer.model.chat_template import render_chat
from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from tests.support.gpt_oss_models import write_tiny_gpt_oss_gguf

pytestmark = pytest.mark.llama
pytest.importorskip("llama_cpp")

from tests.support.llama_reference import assert_tokenizer_matches, llama_greedy, open_llama  # noqa: E402

STEPS = 64
PROMPT = "the router picks two experts"
DTYPES = {"mxfp4": ("mxfp4", "q8_0"), "f32": ("f32", "f32")}  # name -> (expert dtype, dense dtype)
MAX_RELATIVE = {"mxfp4": 2e-2, "f32": 1e-4}
TEXTS = ["the quick brown fox", "hello  world\tand\ttabs\nnew\n\nlines", "héllo wörld — ☃ 日本語 🙂 ÀÉÎ Straße",
         "  two leading", "trailing spaces   ", "don't we'll THE Experts 12345 3.14!! HeLLo I'M", "\t\n",
         "<|start|>user<|message|>hi<|end|><|return|>", "", "a/b\r\nc//d 2026-12-05, x=1234567; ÉCOLE école ΣΊΣΥΦΟΣ ǅemal",
         "n\u0303o se\u0301"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt-oss")
    return {name: write_tiny_gpt_oss_gguf(directory / f"gpt-oss-{name}.gguf", expert_dtype=experts, dense_dtype=dense,
                                          seed=3) for name, (experts, dense) in DTYPES.items()}


@pytest.mark.parametrize("name", DTYPES)
def test_greedy_generation_matches_llama_cpp(models, name):
    info = models[name]
    llm = open_llama(info.path)
    model = MoEModel.load(info.path)
    prompt = load_tokenizer(model.source.parts[0]).encode(PROMPT)
    assert prompt == llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    theirs_tokens, theirs = llama_greedy(llm, prompt, STEPS)
    result = generate(model, prompt, STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True, keep_logits=True)
    ours = np.stack(result.step_logits)
    differing = [step for step, (a, b) in enumerate(zip(result.tokens, theirs_tokens)) if a != b]
    assert not differing, f"greedy tokens differ from llama.cpp first at step {differing[0]}"
    errors = np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1)
    print(f"gpt-oss {name}: {STEPS} tokens identical ({len(set(result.tokens))} distinct), relative logit error "
          f"max {errors.max():.2e}")
    assert errors.max() <= MAX_RELATIVE[name]
    assert len(set(result.tokens)) >= 8, "a degenerate continuation is a weak comparison"
    assert len(prompt) + STEPS > 4 * info.sliding_window and model.hparams.is_sliding_block(0)
    assert not model.hparams.is_sliding_block(1)
    for block in result.routings[0]:
        counts = np.bincount(np.concatenate([routing[block].experts.ravel() for routing in result.routings]),
                             minlength=info.n_experts)
        assert (counts > 0).sum() >= 6, (block, counts.tolist())


def test_tokenizer_and_chat_template_match_llama_cpp(models):
    info = models["f32"]
    llm = open_llama(info.path)
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    assert_tokenizer_matches(llm, tokenizer, TEXTS)
    rendered = render_chat(tokenizer, [{"role": "user", "content": "héllo 123"}])
    assert rendered == "<|start|>user<|message|>héllo 123<|end|><|start|>assistant"
    assert tokenizer.encode(rendered, False, True) == llm.tokenize(rendered.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("key", ["attention.sliding_window", "expert_feed_forward_length", "rope.scaling.factor"])
def test_a_missing_key_is_named(tmp_path, key):
    info = write_tiny_gpt_oss_gguf(tmp_path / "missing.gguf", expert_dtype="f32", dense_dtype="f32", n_layers=1,
                                   omit_key=key)
    with pytest.raises(UnsupportedModelError, match=f"gpt-oss.{key} is missing"):
        MoEModel.load(info.path)


@pytest.mark.slow  # starts the process graph
def test_the_graph_with_a_small_cache_matches_llama_cpp(models, leak_guard, tmp_path):
    from tests.support.generate_runs import run_generate

    info = models["mxfp4"]
    flags = ["--prompt", PROMPT, "-n", STEPS, "--ignore-eos", "--compute-workers", 1, "--cache-slots", 4,
             "--predictors", "gate"]
    run = run_generate(leak_guard, info.path, *flags, workdir=tmp_path, cache_dir=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    result = run.result
    theirs, _ = llama_greedy(open_llama(info.path), result["prompt_tokens"], STEPS)
    differing = [step for step, (a, b) in enumerate(zip(result["tokens"], theirs)) if a != b]
    assert not differing, f"the graph's greedy tokens differ from llama.cpp first at step {differing[0]}"
    assert result["misses"] > 0 and result["hits"] > 0  # 4 slots for 16 experts
    gate = result["predictors"]["gate"]  # the gate predictor applies gpt-oss's router (with its bias)
    assert gate["issued"] > 0 and gate["used"] > 0 and [layer["layer"] for layer in gate["per_layer"]] == [1]


@pytest.mark.parametrize("key", ["rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast"])
def test_an_unsupported_key_is_named(tmp_path, key):
    info = write_tiny_gpt_oss_gguf(tmp_path / "unsupported.gguf", expert_dtype="f32", dense_dtype="f32", n_layers=1,
                                   extra_float_keys={key: 0.1})
    with pytest.raises(UnsupportedModelError, match=f"gpt-oss.{key} is not supported"):
        MoEModel.load(info.path)
