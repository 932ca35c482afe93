"""glm4moe through the console scripts: `convert` stores only the routed experts of the blocks the model
runs (the NextN block's experts are never converted; the ungated shared expert stays a dense weight of
the GGUF), and `generate --json` with the gate predictor (sigmoid scores ranked with the selection bias)
and a cache of 6 slots for 32 experts gives the single-process model's and llama.cpp's greedy tokens
for 64 steps."""

from __future__ import annotations

import pytest

from mer.store.gguf_source import read_gguf_source
from tests.support.glm4moe_models import write_tiny_glm4moe_gguf
from tests.support.moe_cli_checks import assert_generate_matches_references, convert_json

pytestmark = pytest.mark.slow  # starts the process graph


def test_convert_stores_only_the_routed_experts_of_the_blocks_run(tmp_path):
    """4 blocks in the file: dense block 0, MoE blocks 1-2 and the NextN block 3 (its experts q8_0, the
    others q4_0): 2 MoE layers x 16 experts are stored, all q4_0, and nothing of block 3."""
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", seed=1, nextn_expert_dtype="q8_0")
    converted, manifest = convert_json(info.path, tmp_path / "store")
    one_expert = read_gguf_source(info.path).expert_format(0).payload_nbytes
    assert one_expert == 3 * 64 * 64 // 32 * 18  # q4_0 gate, up, down: no shared expert in a payload
    assert converted["experts"] == 32 == manifest.geometry.num_experts  # 2 MoE blocks x 16
    assert manifest.total_payload_nbytes() == 32 * one_expert  # no q8_0 expert of the NextN block
    assert (manifest.geometry.num_layers, manifest.geometry.num_moe_layers) == (3, 2)
    assert (manifest.geometry.d_ff, manifest.geometry.top_k) == (64, 4)


def test_generate_with_the_gate_predictor_and_a_small_cache_matches_the_references(leak_guard, tmp_path):
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", dense_dtype="q8_0", seed=1)
    assert_generate_matches_references(leak_guard, info.path, "the router picks two experts", 64, 6, 8, tmp_path)
