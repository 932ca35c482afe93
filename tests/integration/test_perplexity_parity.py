"""`mer-pipeline perplexity` through the real process graph against llama.cpp's perplexity.

The reference (tests/support/perplexity_reference.py) is llama-perplexity's arithmetic written out
again over llama.cpp's own logits (llama-cpp-python, logits for every position, f32 KV cache), with
llama.cpp's tokenizer and the same chunking. Tolerances (relative, on the final value, each running
value and the ± error): 1e-3 for an f32 model, 1e-2 for a quantized one (q8_0 activations are rounded
the ggml way in both engines, but an element on a rounding boundary can round the other way).

- a tiny random Mixtral-style model (arch `llama` with experts) in f32, chunks of 64;
- the same geometry quantized (q4_0 experts, q8_0 dense matrices) run with a cache of only 2 slots
  and prefill passes of 24 tokens, so every chunk streams its experts through the slots in several
  expert-major passes;
- qwen2moe (a Q4_K_M-like q4_K/q6_K mix, its shared expert resident), gpt-oss (MXFP4 experts,
  q8_0 dense), deepseek2 in both styles and glm4moe (q4_0 experts, q8_0 dense), 16 or 32 routed
  experts through 4 slots with the gate predictor on;
- the embedded model (q8_0) on its shipped held-out text, as `mer-pipeline perplexity` runs with no
  arguments (4 chunks of its full context, 256).

Each run's log has one `perplexity_chunk_done` per chunk and the `perplexity_summary`; stderr shows the
per-chunk progress; stdout is exactly the JSON object.
"""

from __future__ import annotations

import json

import pytest

from mer.models import held_out_text_path
from tests.support.generate_runs import run_cli_to_end
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, read_json_lines

pytestmark = [pytest.mark.slow, pytest.mark.llama]  # starts the process graph; llama.cpp is the reference
pytest.importorskip("llama_cpp")

from tests.support.perplexity_reference import llama_perplexity  # noqa: E402  (needs llama_cpp)

TEXT_CHARS = 3000  # of the held-out text: ~1,000 tokens of the random models' small vocabulary


def run_perplexity(guard, tmp_path, *flags: str) -> tuple[dict, str, list[dict]]:
    log_path = tmp_path / "perplexity.jsonl"
    argv = [MER_PIPELINE, "perplexity", *flags, "--json", "--log-file", str(log_path),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    returncode, stdout, stderr = run_cli_to_end(guard, argv, cache_dir=tmp_path / "cache", log_path=log_path)
    assert returncode == 0, stderr
    return json.loads(stdout), stderr, read_json_lines(log_path)


def assert_agrees(result: dict, stderr: str, events: list[dict], reference, tolerance: float) -> None:
    print(f"mer {result['ppl']:.6f} +/- {result['ppl_error']:.6f}, llama.cpp {reference.ppl:.6f} +/- "
          f"{reference.ppl_error:.6f} (relative {abs(result['ppl'] / reference.ppl - 1):.2e}), "
          f"{result['chunks']} chunks of {result['context']}")
    assert result["kind"] == "perplexity"
    assert result["text_tokens"] == reference.tokens  # the same tokenization as llama.cpp's
    assert result["chunks"] == reference.chunks
    assert result["scored_tokens"] == reference.chunks * (result["context"] - result["context"] // 2 - 1)
    assert result["running_ppl"] == pytest.approx(reference.running, rel=tolerance)
    assert result["ppl"] == pytest.approx(reference.ppl, rel=tolerance)
    assert result["ppl_error"] == pytest.approx(reference.ppl_error, rel=tolerance)
    chunks = [event for event in events if event.get("event") == "perplexity_chunk_done"]
    assert [event["chunk"] for event in chunks] == list(range(reference.chunks))
    assert [event["running_ppl"] for event in chunks] == result["running_ppl"]
    assert [event for event in events if event.get("event") == "perplexity_summary"][0]["ppl"] == result["ppl"]
    assert f"[{reference.chunks}/{reference.chunks}]" in stderr


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("perplexity-text") / "text.txt"
    path.write_text(held_out_text_path().read_text()[:TEXT_CHARS])
    return path


def test_an_f32_model_agrees_with_llama_cpp_to_1e_3(leak_guard, tmp_path, text_file):
    info = write_tiny_moe_gguf(tmp_path / "f32.gguf", dtypes=("f32",) * 3, dense_dtype="f32", n_layers=2, n_experts=8,
                               top_k=2, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, vocab_size=384, seed=4)
    result, stderr, events = run_perplexity(leak_guard, tmp_path, "--model", str(info.path), "--file", str(text_file),
                                            "--ctx", "64", "--chunks", "6")
    assert_agrees(result, stderr, events, llama_perplexity(info.path, text_file.read_text(), 64, 6), 1e-3)


def test_a_quantized_model_streamed_through_two_slots_agrees_with_llama_cpp_to_1e_2(leak_guard, tmp_path, text_file):
    info = write_tiny_moe_gguf(tmp_path / "q4_0.gguf", dtypes=("q4_0",) * 3, dense_dtype="q8_0", n_layers=2,
                               n_experts=8, top_k=2, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, vocab_size=384,
                               seed=5)
    result, stderr, events = run_perplexity(leak_guard, tmp_path, "--model", str(info.path), "--file", str(text_file),
                                            "--ctx", "64", "--chunks", "4", "--cache-slots", "2",
                                            "--prefill-chunk", "24")
    assert result["cache_slots"] == 2 and result["misses"] > 0
    assert_agrees(result, stderr, events, llama_perplexity(info.path, text_file.read_text(), 64, 4), 1e-2)


def test_the_embedded_model_on_its_held_out_text_agrees_with_llama_cpp_to_1e_2(leak_guard, tmp_path):
    from mer.models import tiny_model_path

    result, stderr, events = run_perplexity(leak_guard, tmp_path, "--chunks", "4")
    assert result["context"] == 256 and "--ctx 256 (the model's context" in stderr
    assert result["file"] == str(held_out_text_path())
    assert_agrees(result, stderr, events, llama_perplexity(tiny_model_path(), held_out_text_path().read_text(), 256, 4),
                  1e-2)


def write_qwen2moe_q4_k_m(path):  # type: ignore[no-untyped-def]
    """qwen2moe as real files have it: q4_K / q6_K experts and shared experts, q4_K dense matrices."""
    return write_tiny_moe_gguf(path, arch="qwen2moe", layer_dtypes=[("q4_k", "q4_k", "q6_k"), ("q4_k", "q4_k", "q4_k")],
                               dense_dtype="q4_k", n_layers=2, n_experts=8, top_k=2, d_model=256, d_ff=256, n_heads=4,
                               n_kv_heads=2, vocab_size=384, tokenizer="bpe", seed=3)


def write_gpt_oss_mxfp4(path):  # type: ignore[no-untyped-def]
    from tests.support.gpt_oss_models import write_tiny_gpt_oss_gguf

    return write_tiny_gpt_oss_gguf(path, expert_dtype="mxfp4", dense_dtype="q8_0", seed=3)


def write_deepseek2_v2_lite(path):  # type: ignore[no-untyped-def]
    from tests.support.deepseek2_models import write_tiny_deepseek2_gguf

    return write_tiny_deepseek2_gguf(path, style="v2-lite", expert_dtype="q4_0", dense_dtype="q8_0", seed=1)


def write_deepseek2_v3(path):  # type: ignore[no-untyped-def]
    from tests.support.deepseek2_models import write_tiny_deepseek2_gguf

    return write_tiny_deepseek2_gguf(path, style="v3", expert_dtype="q4_0", dense_dtype="q8_0", seed=1)


def write_glm4moe(path):  # type: ignore[no-untyped-def]
    from tests.support.glm4moe_models import write_tiny_glm4moe_gguf

    return write_tiny_glm4moe_gguf(path, expert_dtype="q4_0", dense_dtype="q8_0", seed=1)


@pytest.mark.parametrize("writer", [write_qwen2moe_q4_k_m, write_gpt_oss_mxfp4, write_deepseek2_v2_lite,
                                    write_deepseek2_v3, write_glm4moe],
                         ids=["qwen2moe", "gpt-oss", "deepseek2-v2-lite", "deepseek2-v3", "glm4moe"])
def test_each_new_architecture_streamed_through_four_slots_agrees_with_llama_cpp_to_1e_2(
        leak_guard, tmp_path, text_file, writer):
    """qwen2moe (its shared expert resident), gpt-oss (sinks, sliding window, MXFP4 experts with
    biases) and deepseek2 (MLA with its compressed cache, ungated shared expert; V3: sigmoid routing,
    selection bias, grouped top-k; glm4moe: partial NEOX rope, sigmoid routing, NextN block skipped): 16 or
    32 routed experts through 4 slots, the gate predictor on."""
    info = writer(tmp_path / "model.gguf")
    result, stderr, events = run_perplexity(leak_guard, tmp_path, "--model", str(info.path), "--file", str(text_file),
                                            "--ctx", "64", "--chunks", "4", "--cache-slots", "4",
                                            "--predictors", "gate")
    assert result["cache_slots"] == 4 and result["misses"] > 0
    assert_agrees(result, stderr, events, llama_perplexity(info.path, text_file.read_text(), 64, 4), 1e-2)
