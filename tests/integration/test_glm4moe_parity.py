"""glm4moe against llama.cpp (llama-cpp-python 0.3.36), on tiny random models from `tests/support/glm4moe_models.py`.

GLM-4.5-style, 3 blocks run (block 0 dense, blocks 1-2 MoE with 16 experts, top-4, and an ungated
shared expert) plus one NextN block at the end of the file, which llama.cpp loads but never runs and
mer skips; 4 query heads and 2 KV heads of 32 with q/k/v biases, NEOX RoPE on the first 16 values of
each head, sigmoid routing with the selection-only bias exp_probs_b, weights normalised times 2.5.

Checked, in one process: 64 greedy tokens identical to llama.cpp's and the logits per step within
(largest difference / largest llama.cpp logit) MAX_RELATIVE, for f32 and q8_0 attention with q4_0
experts (d_model 64) and q4_K experts (d_model 256), with and without the per-head q/k norms (optional
in the file), with and without the `expert_gating_func` key (absent: sigmoid, llama.cpp's default for
glm4moe); the NextN block is never loaded (its tensors are not among the model's, its experts not
in the source, its bytes not in the RAM budget's dense part); tokenization (pre-tokenizer "glm4",
GLM's special tokens) equals llama.cpp's; multi-section RoPE is refused by name.
"""

from __future__ import annotations

import pytest

from mer.errors import UnsupportedModelError
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from mer.runtime.ram_budget import dense_nbytes, kv_cache_nbytes
from tests.support.glm4moe_models import write_tiny_glm4moe_gguf

pytestmark = pytest.mark.llama
pytest.importorskip("llama_cpp")

from tests.support.llama_reference import (assert_greedy_matches_llama, assert_tokenizer_matches,  # noqa: E402
                                          open_llama)

STEPS = 64
PROMPT = "the router picks two experts"
# name -> (expert dtype, dense dtype, d_model (= expert d_ff for q4_K's 256-blocks), q/k norms, gating key, seed).
# The seeds are ones whose continuations meet no near-tie of llama.cpp's two best logits at a step where
# a q8_0 / Q8_K rounding flip moves the logits (seed 0 of f32-q4_K flips at one step by 1.2e-2).
CASES = {
    "f32-q4_0": ("q4_0", "f32", 64, True, True, 0),
    "q8_0-q4_0": ("q4_0", "q8_0", 64, True, True, 1),
    "q8_0-q4_0-no-qk-norm-no-gating-key": ("q4_0", "q8_0", 64, False, False, 0),
    "f32-q4_K": ("q4_k", "f32", 256, True, True, 1),
    "q8_0-q4_K": ("q4_k", "q8_0", 256, False, True, 1),
}
# Per step: most steps agree to float32 noise (MEDIAN_RELATIVE); now and then that noise moves one matmul
# input across a q8_0 / Q8_K rounding boundary, which shifts that step's logits by up to ~2e-2
# (MAX_RELATIVE), as in the deepseek2 and part 1 comparisons (docs/model.md).
MAX_RELATIVE = 5e-2
MEDIAN_RELATIVE = 1e-5


def write_case(directory, name: str, **kwargs):
    experts, dense, d_model, qk_norm, gating_key, seed = CASES[name]
    return write_tiny_glm4moe_gguf(directory / f"{name}.gguf", expert_dtype=experts, dense_dtype=dense,
                                   d_model=d_model, d_ff=d_model, qk_norm=qk_norm, gating_key=gating_key, seed=seed,
                                   **kwargs)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_llama_cpp(tmp_path, name):
    info = write_case(tmp_path, name)
    llm = open_llama(info.path)
    model = MoEModel.load(info.path)
    assert (model.hparams.num_blocks, model.hparams.nextn_blocks, sorted(model.moe_layers)) == (3, 1, [1, 2])
    assert (model.hparams.rope_dimensions, model.hparams.head_dim) == (16, 32)
    function = model.hparams.routing_function
    assert (function.score, function.normalize, function.scale) == ("sigmoid", True, 2.5)
    assert_greedy_matches_llama(llm, model, PROMPT, STEPS, info.n_experts, MAX_RELATIVE, MEDIAN_RELATIVE,
                                f"glm4moe {name}")

def test_the_nextn_block_is_never_loaded_nor_counted(tmp_path):
    """The NextN block (block 3 of 4; its experts deliberately q8_0, the others q4_0) is skipped: no MoE
    layer of it in the source, none of its tensors among the model's weights, its bytes not in the
    dense part the RAM budget counts; a file without NextN blocks runs every block."""
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", nextn_expert_dtype="q8_0")
    model = MoEModel.load(info.path, resident=True)
    source = model.source
    assert [layer.block for layer in source.layers] == [1, 2] and source.nextn_blocks == 1
    assert source.geometry.num_layers == 3 and source.geometry.num_moe_layers == 2
    assert {layer.dtypes for layer in source.layers} == {("q4_0",) * 3}
    assert len(model.weights.blocks) == 3 and model.new_kv_cache(8).keys.shape == (3, 8, 2, 32)
    assert kv_cache_nbytes(model.hparams, 8) == 3 * 8 * 2 * (2 * 32) * 4  # keys and values of the 3 blocks run
    nextn = [tensor for part in source.parts for tensor in part.tensors if tensor.name.startswith("blk.3.")]
    assert {"blk.3.nextn.eh_proj.weight", "blk.3.ffn_up_exps.weight", "blk.3.attn_q.weight"} <= {t.name for t in nextn}
    everything_else = sum(tensor.nbytes for part in source.parts for tensor in part.tensors
                          if not tensor.name.startswith("blk.3.") and "_exps." not in tensor.name)
    assert dense_nbytes(source) == everything_else
    assert all(source.is_skipped(tensor.name) for tensor in nextn)
    plain = MoEModel.load(write_tiny_glm4moe_gguf(tmp_path / "plain.gguf", n_nextn=0).path)
    assert (plain.hparams.num_blocks, plain.hparams.nextn_blocks, plain.source.nextn_blocks) == (3, 0, 0)
    assert dense_nbytes(plain.source) == everything_else


TEXTS = ["the quick brown fox", "hello  world\tand\ttabs\nnew\n\nlines", "héllo wörld — ☃ 日本語 🙂 ÀÉÎ Straße",
         "  two leading", "trailing spaces   ", "don't we'll THE Experts 12345 3.14!! HeLLo I'M", "\t\n", "",
         "中文字符和日本語のひらがなカタカナ 한국어 텍스트", "ＦＵＬＬ ｗｉｄｔｈ！ “quotes” 、。「」", "a/b\r\nc//d 2026-12-05, x=1234567;",
         "ÉCOLE école ΣΊΣΥΦΟΣ ǅemal Kelvin\u212a Ω\u2126 ι\u1fbe", "#tag @user $5 ++i --j",
         "[gMASK]<sop><|user|>\nhi<|assistant|>\nok<|endoftext|>"]


def test_tokenizer_matches_llama_cpp(tmp_path):
    """The glm4 pre-tokenizer (llama3's expression, merges not ignored), GLM's special tokens, no BOS added."""
    info = write_tiny_glm4moe_gguf(tmp_path / "t.gguf", expert_dtype="f32", n_layers=2)
    llm = open_llama(info.path)
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    assert_tokenizer_matches(llm, tokenizer, TEXTS)
    assert tokenizer.encode("hello", True, False) == llm.tokenize(b"hello", add_bos=False, special=False)


def test_multi_section_rope_is_refused_by_name(tmp_path):
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", expert_dtype="f32",
                                   extra_keys={"rope.dimension_sections": 8})
    with pytest.raises(UnsupportedModelError, match="glm4moe.rope.dimension_sections"):
        MoEModel.load(info.path)
