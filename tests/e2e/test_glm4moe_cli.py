"""glm4moe through the console scripts: `convert` stores only the routed experts of the blocks the model
runs (the NextN block's experts are never converted; the ungated shared expert stays a dense weight of
the GGUF), and `generate --json` with the gate predictor (sigmoid scores ranked with the selection bias)
and a cache of 6 slots for 32 experts gives the single-process model's and llama.cpp's greedy tokens
for 64 steps."""

from __future__ import annotations

import json
import subprocess

import pytest

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.store.gguf_source import read_gguf_source
from mer.store.reader import ExpertStore
from tests.support.generate_runs import run_generate
from tests.support.glm4moe_models import write_tiny_glm4moe_gguf
from tests.support.pipeline_runs import MER_PIPELINE

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "the router picks two experts"
STEPS = 64


def test_convert_stores_only_the_routed_experts_of_the_blocks_run(tmp_path):
    """4 blocks in the file: dense block 0, MoE blocks 1-2 and the NextN block 3 (its experts q8_0, the
    others q4_0): 2 MoE layers x 16 experts are stored, all q4_0, and nothing of block 3."""
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", seed=1, nextn_expert_dtype="q8_0")
    done = subprocess.run([str(MER_PIPELINE), "convert", str(info.path), "--out", str(tmp_path / "store"), "--json",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = ExpertStore.open(tmp_path / "store").manifest
    one_expert = read_gguf_source(info.path).expert_format(0).payload_nbytes
    assert one_expert == 3 * 64 * 64 // 32 * 18  # q4_0 gate, up, down: no shared expert in a payload
    assert json.loads(done.stdout)["experts"] == 32 == manifest.geometry.num_experts  # 2 MoE blocks x 16
    assert manifest.total_payload_nbytes() == 32 * one_expert  # no q8_0 expert of the NextN block
    assert (manifest.geometry.num_layers, manifest.geometry.num_moe_layers) == (3, 2)
    assert (manifest.geometry.d_ff, manifest.geometry.top_k) == (64, 4)


def test_generate_with_the_gate_predictor_and_a_small_cache_matches_the_references(leak_guard, tmp_path):
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", dense_dtype="q8_0", seed=1)
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", STEPS, "--ignore-eos", "--compute-workers", 1,
                       "--cache-slots", 6, "--predictors", "gate", "--predict-fanout", 2,
                       workdir=tmp_path, cache_dir=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    result = run.result
    model = MoEModel.load(info.path)
    reference = generate(model, result["prompt_tokens"], STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True)
    assert result["tokens"] == reference.tokens and len(set(result["tokens"])) >= 8
    assert result["misses"] > 0 and result["hits"] > 0  # 6 slots for 32 experts
    gate = result["predictors"]["gate"]
    assert gate["issued"] > 0 and gate["used"] > 0
    assert [(layer["layer"], layer["ahead"]) for layer in gate["per_layer"]] == [(1, 1)]
    assert all(layer["topk_accuracy_pct"] > 0 for layer in gate["per_layer"])  # it ranks as the router routes
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import llama_greedy, open_llama

    theirs, _ = llama_greedy(open_llama(info.path), result["prompt_tokens"], STEPS)
    assert result["tokens"] == theirs
