"""deepseek2 against llama.cpp (llama-cpp-python 0.3.36), on tiny random models from `tests/support/deepseek2_models.py`.

Both styles llama.cpp reads, 3 blocks (block 0 dense, blocks 1-2 MoE with 16 experts and an
ungated shared expert), 4 heads of MLA (kv_lora_rank 64, qk_nope 32, qk_rope 16, v_head 32):

- "v2-lite": plain attn_q, softmax routing top-2 without renormalisation, scale 1.5;
- "v3": attn_q_a/attn_q_a_norm/attn_q_b (q_lora_rank 64), sigmoid scores, the selection-only bias
  exp_probs_b, grouped top-4 (4 groups of 4, 2 used), normalised weights times 2.5.

Checked, in one process: 64 greedy tokens identical to llama.cpp's and the logits per step within
(largest difference / largest llama.cpp logit) MAX_RELATIVE, for f32 and q8_0 attention with q4_0
experts (d_model 64) and q4_K experts (d_model 256), and with YaRN as DeepSeek's files have it
(`yarn_log_multiplier` 0.0707, factor 8 or 4 over a quarter of the context: the attention scale's
mscale^2 and the rope parts' YaRN angles); a file of an older converter (attn_kv_b), NextN layers and
YaRN overrides are refused by name.
"""

from __future__ import annotations

import pytest

from mer.errors import UnsupportedModelError
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf

pytestmark = pytest.mark.llama
pytest.importorskip("llama_cpp")

from tests.support.llama_reference import (assert_greedy_matches_llama, assert_tokenizer_matches,  # noqa: E402
                                          open_llama)

STEPS = 64
PROMPT = "the router picks two experts"
# name -> (style, expert dtype, dense dtype, d_model (= expert d_ff for q4_K's 256-blocks), seed). The
# seeds are ones whose continuations meet no near-tie of llama.cpp's two best logits at a step where a
# rounding flip (below) moves the logits: such a tie would part the tokens of any two implementations
# that differ by float32 noise (seed 1 of v2-lite-q8_0-q4_0 parts at step 46 that way).
CASES = {
    "v2-lite-f32-q4_0": ("v2-lite", "q4_0", "f32", 64, 1),
    "v2-lite-q8_0-q4_0": ("v2-lite", "q4_0", "q8_0", 64, 0),
    "v3-f32-q4_0": ("v3", "q4_0", "f32", 64, 1),
    "v3-q8_0-q4_0": ("v3", "q4_0", "q8_0", 64, 1),
    "v3-f32-q4_K": ("v3", "q4_k", "f32", 256, 1),
    "v3-q8_0-q4_K": ("v3", "q4_k", "q8_0", 256, 1),
    "v2-lite-q8_0-q4_K": ("v2-lite", "q4_k", "q8_0", 256, 1),
    "v2-lite-q8_0-q4_0-yarn8": ("v2-lite", "q4_0", "q8_0", 64, 1),
    "v3-q8_0-q4_0-yarn4": ("v3", "q4_0", "q8_0", 64, 1),
}
# Per step: most steps agree to float32 noise (MEDIAN_RELATIVE); now and then that noise (~5e-7 after
# MLA's extra products) moves one matmul input across a q8_0 / Q8_K rounding boundary, which shifts
# that step's logits by up to ~2e-2 (MAX_RELATIVE), as the f16 inputs of part 1 do (docs/model.md).
MAX_RELATIVE = 5e-2
MEDIAN_RELATIVE = 1e-5


def write_case(directory, name: str, **kwargs):
    style, experts, dense, d_model, seed = CASES[name]
    yarn_factor = float(name.split("-yarn")[1]) if "-yarn" in name else 0.0  # YaRN as DeepSeek's files have it
    return write_tiny_deepseek2_gguf(directory / f"{name}.gguf", style=style, expert_dtype=experts, dense_dtype=dense,
                                     d_model=d_model, d_ff=d_model, seed=seed, yarn_factor=yarn_factor, **kwargs)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_llama_cpp(tmp_path, name):
    info = write_case(tmp_path, name)
    llm = open_llama(info.path)
    model = MoEModel.load(info.path)
    assert_greedy_matches_llama(llm, model, PROMPT, STEPS, info.n_experts, MAX_RELATIVE, MEDIAN_RELATIVE,
                                f"deepseek2 {name}")

TEXTS = ["the quick brown fox", "hello  world\tand\ttabs\nnew\n\nlines", "héllo wörld — ☃ 日本語 🙂 ÀÉÎ Straße",
         "  two leading", "trailing spaces   ", "don't we'll THE Experts 12345 3.14!! HeLLo I'M", "\t\n", "",
         "中文字符和日本語のひらがなカタカナ 한국어 텍스트", "ＦＵＬＬ ｗｉｄｔｈ！ “quotes” 、。「」", "a/b\r\nc//d 2026-12-05, x=1234567;",
         "ÉCOLE école ΣΊΣΥΦΟΣ ǅemal Kelvin\u212a Ω\u2126 ι\u1fbe", "n\u0303o se\u0301 ٣٤٥ १२३", "#tag @user $5 ++i --j",
         "<｜User｜>hi<｜Assistant｜>ok<｜end▁of▁sentence｜>"]


@pytest.mark.parametrize("style", ["v2-lite", "v3"])
def test_tokenizer_matches_llama_cpp(tmp_path, style):
    """deepseek-llm (v2-lite) and deepseek-v3 (v3) pre-tokenizers, special tokens, BOS."""
    info = write_tiny_deepseek2_gguf(tmp_path / f"{style}.gguf", style=style, expert_dtype="f32", n_layers=2)
    llm = open_llama(info.path)
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    assert_tokenizer_matches(llm, tokenizer, TEXTS)


def test_an_older_conversion_with_attn_kv_b_is_refused_by_name(tmp_path):
    info = write_tiny_deepseek2_gguf(tmp_path / "legacy.gguf", expert_dtype="f32", legacy_kv_b=True)
    with pytest.raises(UnsupportedModelError, match="attn_kv_b"):
        MoEModel.load(info.path)


@pytest.mark.parametrize("key, value", [("nextn_predict_layers", 1), ("attention.temperature_scale", 0.1),
                                        ("rope.scaling.yarn_beta_fast", 16.0)])
def test_unsupported_keys_are_named(tmp_path, key, value):
    info = write_tiny_deepseek2_gguf(tmp_path / "unsupported.gguf", expert_dtype="f32", extra_keys={key: value})
    with pytest.raises(UnsupportedModelError, match=f"deepseek2.{key}"):
        MoEModel.load(info.path)
