"""deepseek2 through the console scripts: `convert` stores only the routed experts (the ungated shared
expert and MLA's tensors stay dense weights of the GGUF), and `generate --json` with the gate predictor
(softmax ranking for V2-Lite, sigmoid with the selection bias and grouped top-k for V3) and a cache of
4 slots for 32 experts gives the single-process model's and llama.cpp's greedy tokens."""

from __future__ import annotations

import pytest

from mer.store.gguf_source import read_gguf_source
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf
from tests.support.moe_cli_checks import assert_generate_matches_references, convert_json

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "the router picks two experts"
STEPS = 32


def test_convert_stores_only_the_routed_experts(tmp_path):
    info = write_tiny_deepseek2_gguf(tmp_path / "m.gguf", style="v3", seed=1)
    converted, manifest = convert_json(info.path, tmp_path / "store")
    one_expert = read_gguf_source(info.path).expert_format(0).payload_nbytes
    assert one_expert == 3 * 64 * 64 // 32 * 18  # q4_0 gate, up, down: no shared expert in a payload
    assert converted["experts"] == 32 == manifest.geometry.num_experts  # 2 MoE blocks x 16
    assert manifest.total_payload_nbytes() == 32 * one_expert
    assert (manifest.geometry.d_ff, manifest.geometry.top_k) == (64, 4)


@pytest.mark.parametrize("style", ["v2-lite", "v3"])
def test_generate_with_the_gate_predictor_and_a_small_cache_matches_the_references(leak_guard, tmp_path, style):
    info = write_tiny_deepseek2_gguf(tmp_path / "m.gguf", style=style, dense_dtype="q8_0", seed=1)
    assert_generate_matches_references(leak_guard, info.path, PROMPT, STEPS, 4 if style == "v2-lite" else 6, 6,
                                       tmp_path)
