"""deepseek2 through the console scripts: `convert` stores only the routed experts (the ungated shared
expert and MLA's tensors stay dense weights of the GGUF), and `generate --json` with the gate predictor
(softmax ranking for V2-Lite, sigmoid with the selection bias and grouped top-k for V3) and a cache of
4 slots for 32 experts gives the single-process model's and llama.cpp's greedy tokens."""

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
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf
from tests.support.generate_runs import run_generate
from tests.support.pipeline_runs import MER_PIPELINE

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "the router picks two experts"
STEPS = 32


def test_convert_stores_only_the_routed_experts(tmp_path):
    info = write_tiny_deepseek2_gguf(tmp_path / "m.gguf", style="v3", seed=1)
    done = subprocess.run([str(MER_PIPELINE), "convert", str(info.path), "--out", str(tmp_path / "store"), "--json",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = ExpertStore.open(tmp_path / "store").manifest
    one_expert = read_gguf_source(info.path).expert_format(0).payload_nbytes
    assert one_expert == 3 * 64 * 64 // 32 * 18  # q4_0 gate, up, down: no shared expert in a payload
    assert json.loads(done.stdout)["experts"] == 32 == manifest.geometry.num_experts  # 2 MoE blocks x 16
    assert manifest.total_payload_nbytes() == 32 * one_expert
    assert (manifest.geometry.d_ff, manifest.geometry.top_k) == (64, 4)


@pytest.mark.parametrize("style", ["v2-lite", "v3"])
def test_generate_with_the_gate_predictor_and_a_small_cache_matches_the_references(leak_guard, tmp_path, style):
    info = write_tiny_deepseek2_gguf(tmp_path / "m.gguf", style=style, dense_dtype="q8_0", seed=1)
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", STEPS, "--ignore-eos", "--compute-workers", 1,
                       "--cache-slots", 4 if style == "v2-lite" else 6, "--predictors", "gate", "--predict-fanout", 2,
                       workdir=tmp_path, cache_dir=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    result = run.result
    model = MoEModel.load(info.path)
    reference = generate(model, result["prompt_tokens"], STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True)
    assert result["tokens"] == reference.tokens and len(set(result["tokens"])) >= 6
    assert result["misses"] > 0 and result["hits"] > 0  # a few slots for 32 experts
    gate = result["predictors"]["gate"]
    assert gate["issued"] > 0 and gate["used"] > 0
    assert [(layer["layer"], layer["ahead"]) for layer in gate["per_layer"]] == [(1, 1)]
    assert all(layer["topk_accuracy_pct"] > 0 for layer in gate["per_layer"])  # it ranks as the router routes
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import llama_greedy, open_llama

    theirs, _ = llama_greedy(open_llama(info.path), result["prompt_tokens"], STEPS)
    assert result["tokens"] == theirs
