"""qwen2moe through the console scripts: `convert` stores only the routed experts (the shared expert
stays a dense weight of the GGUF), `generate --json` with the gate predictor and a cache smaller than
the experts gives the single-process model's (and llama.cpp's) greedy tokens, and `--ram-budget`'s
plan counts the shared experts among the dense weights."""

from __future__ import annotations

import json
import subprocess

import pytest

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.runtime.ram_budget import MIB, dense_nbytes
from mer.store.gguf_source import read_gguf_source
from mer.store.reader import ExpertStore
from tests.support.generate_runs import run_generate
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import MER_PIPELINE

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "the router picks two experts for every token"
STEPS = 24


def write_model(path, **overrides):  # type: ignore[no-untyped-def]
    arguments = dict(arch="qwen2moe", dtypes=("q4_0",) * 3, dense_dtype="q8_0", n_layers=3, n_experts=8, top_k=2,
                     d_model=64, d_ff=128, dense_d_ff=256, tokenizer="bpe", vocab_size=384, seed=6)
    return write_tiny_moe_gguf(path, **{**arguments, **overrides})


def test_convert_stores_only_the_routed_experts(tmp_path):
    info = write_model(tmp_path / "m.gguf")
    done = subprocess.run([str(MER_PIPELINE), "convert", str(info.path), "--out", str(tmp_path / "store"), "--json",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = ExpertStore.open(tmp_path / "store").manifest
    source = read_gguf_source(info.path)
    one_expert = source.expert_format(0).payload_nbytes
    assert one_expert == 3 * 64 * 128 // 32 * 18  # q4_0 gate, up, down: no shared expert in a payload
    assert json.loads(done.stdout)["experts"] == 24 == manifest.geometry.num_experts
    assert manifest.total_payload_nbytes() == 24 * one_expert
    assert (manifest.geometry.d_ff, manifest.geometry.top_k) == (128, 2)


def test_generate_with_the_gate_predictor_and_a_small_cache_matches_the_references(leak_guard, tmp_path):
    info = write_model(tmp_path / "m.gguf")
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", STEPS, "--ignore-eos", "--compute-workers", 1,
                       "--cache-slots", 5, "--predictors", "gate", "--predict-fanout", 2, workdir=tmp_path,
                       cache_dir=tmp_path / "cache")
    result = run.result
    model = MoEModel.load(info.path)
    reference = generate(model, result["prompt_tokens"], STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True)
    assert result["tokens"] == reference.tokens and len(set(result["tokens"])) >= 6
    assert result["misses"] > 0 and result["hits"] > 0  # 5 slots for 24 experts
    gate = result["predictors"]["gate"]
    assert gate["issued"] > 0 and gate["used"] > 0
    assert [(layer["layer"], layer["ahead"]) for layer in gate["per_layer"]] == [(1, 1), (2, 1)]
    assert all(layer["topk_accuracy_pct"] > 0 for layer in gate["per_layer"])  # it ranks as the router routes
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import llama_greedy, open_llama

    theirs, _ = llama_greedy(open_llama(info.path), result["prompt_tokens"], STEPS)
    assert result["tokens"] == theirs


def test_the_ram_budget_counts_the_shared_experts_as_dense_weights(leak_guard, tmp_path):
    info = write_model(tmp_path / "m.gguf", dense_dtype="f32", dtypes=("f32",) * 3, dense_d_ff=4096)
    source = read_gguf_source(info.path)
    shared = sum(tensor.nbytes for tensor in source.parts[0].tensors if "_shexp." in tensor.name)
    assert shared == 3 * (4 * 64 + 3 * 4 * 64 * 4096)  # 9 MiB of the 3 blocks' shared experts
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 2, "--ram-budget", "200MiB",
                       workdir=tmp_path, cache_dir=tmp_path / "cache")
    assert run.returncode != 0 and run.stdout == ""
    assert f"dense weights {dense_nbytes(source) / MIB:,.1f} MiB" in run.stderr, run.stderr
    assert dense_nbytes(source) > shared


@pytest.mark.parametrize("omit_keys, message", [
    (("qwen2moe.feed_forward_length", "qwen2moe.expert_shared_feed_forward_length"),
     "metadata key qwen2moe.expert_shared_feed_forward_length is missing"),
    (("qwen2moe.expert_count",), "metadata key qwen2moe.expert_count is missing"),
    (("qwen2moe.attention.layer_norm_rms_epsilon",), "metadata key qwen2moe.attention.layer_norm_rms_epsilon is missing"),
])
def test_a_missing_key_is_a_clear_error_naming_it(omit_keys, message, leak_guard, tmp_path):
    info = write_model(tmp_path / "m.gguf", omit_keys=omit_keys)
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 2, workdir=tmp_path,
                       cache_dir=tmp_path / "cache")
    assert run.returncode != 0 and run.stdout == ""
    assert "mer-pipeline generate: error:" in run.stderr and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
