"""Hyper-parameters from GGUF metadata: values, llama.cpp's defaults, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFWriter

from mer.errors import GGUFError, UnsupportedModelError
from mer.model.hparams import QK_NORM_NONE, QK_NORM_PER_HEAD, QK_NORM_WHOLE, ROPE_NEOX, ROPE_NORMAL, read_hparams
from mer.store.gguf_files import open_part
from tests.support.gguf_models import write_tiny_moe_gguf

BASE_KEYS = {
    "context_length": 512, "embedding_length": 64, "block_count": 2, "attention.head_count": 4,
    "attention.layer_norm_rms_epsilon": 1e-5, "expert_count": 8, "expert_used_count": 2,
}


def write_metadata(path: Path, arch: str, keys: dict) -> Path:
    """A GGUF holding only metadata: `general.architecture` and `{arch}.KEY` for each key."""
    writer = GGUFWriter(path, arch)
    for key, value in keys.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch, rope, qk_norm, normalize", [
    ("llama", ROPE_NORMAL, QK_NORM_NONE, True),
    ("qwen3moe", ROPE_NEOX, QK_NORM_PER_HEAD, True),
    ("olmoe", ROPE_NEOX, QK_NORM_WHOLE, False),
    ("qwen2moe", ROPE_NEOX, QK_NORM_NONE, False),
])
def test_tiny_models_read_back(tmp_path, arch, rope, qk_norm, normalize):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch=arch, n_layers=3, n_experts=8, top_k=3, d_model=96,
                               n_heads=6, n_kv_heads=2, context_length=300)
    hparams = read_hparams(open_part(info.path))
    assert (hparams.architecture, hparams.num_blocks, hparams.d_model, hparams.context_length) == (arch, 3, 96, 300)
    assert (hparams.num_heads, hparams.num_kv_heads, hparams.head_dim, hparams.num_queries_per_kv) == (6, 2, 16, 3)
    assert (hparams.num_experts, hparams.top_k, hparams.rms_norm_eps) == (8, 3, pytest.approx(1e-6))
    assert (hparams.rope_base, hparams.rope_dimensions, hparams.rope_position_scale) == (10000.0, 16, 1.0)
    assert (hparams.rules.rope_style, hparams.rules.qk_norm, hparams.rules.normalize_expert_weights) == (
        rope, qk_norm, normalize)


def test_optional_keys_take_llama_cpp_defaults_and_are_read_when_present(tmp_path):
    plain = read_hparams(open_part(write_metadata(tmp_path / "a.gguf", "llama", BASE_KEYS)))
    assert (plain.num_kv_heads, plain.head_dim, plain.rope_base, plain.rope_dimensions) == (4, 16, 10000.0, 16)
    assert (plain.expert_weights_scale, plain.leading_dense_blocks) == (0.0, 0)
    keys = {**BASE_KEYS, "attention.head_count_kv": 2, "rope.freq_base": 1e6, "attention.key_length": 32,
            "attention.value_length": 32, "rope.dimension_count": 32, "rope.scaling.type": "linear",
            "rope.scaling.factor": 4.0, "expert_weights_scale": 2.5}
    given = read_hparams(open_part(write_metadata(tmp_path / "b.gguf", "qwen3moe", keys)))
    assert (given.num_kv_heads, given.head_dim, given.q_width, given.kv_width) == (2, 32, 128, 64)
    assert (given.rope_base, given.rope_position_scale, given.expert_weights_scale) == (1e6, 0.25, 2.5)


@pytest.mark.parametrize("missing", ["context_length", "embedding_length", "block_count", "attention.head_count",
                                     "attention.layer_norm_rms_epsilon", "expert_used_count"])
def test_a_missing_required_key_is_named(tmp_path, missing):
    keys = {key: value for key, value in BASE_KEYS.items() if key != missing}
    path = write_metadata(tmp_path / "m.gguf", "olmoe", keys)
    with pytest.raises(UnsupportedModelError, match=rf"m\.gguf: metadata key olmoe\.{missing} is missing"):
        read_hparams(open_part(path))


def test_unsupported_architecture_and_dense_model_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        read_hparams(open_part(write_metadata(tmp_path / "g.gguf", "gpt2", BASE_KEYS)))
    dense = {key: value for key, value in BASE_KEYS.items() if not key.startswith("expert")}
    with pytest.raises(UnsupportedModelError, match=r"without llama\.expert_count: a dense model"):
        read_hparams(open_part(write_metadata(tmp_path / "d.gguf", "llama", dense)))


@pytest.mark.parametrize("keys, message", [
    ({"rope.scaling.type": "yarn"}, r"rope\.scaling\.type 'yarn' is not supported"),
    ({"attention.head_count_kv": 3}, r"head_count 4 is not a multiple of attention\.head_count_kv 3"),
    ({"expert_used_count": 9}, r"expert_used_count 9 exceeds expert_count 8"),
    ({"rope.dimension_count": 8}, r"rope\.dimension_count 8 differs from the head size 16"),
    ({"block_count": 0}, r"llama\.block_count is 0, expected an integer >= 1"),
])
def test_inconsistent_keys_are_refused(tmp_path, keys, message):
    with pytest.raises(GGUFError, match=message):
        read_hparams(open_part(write_metadata(tmp_path / "m.gguf", "llama", {**BASE_KEYS, **keys})))


def test_qwen2moe_reads_its_expert_sizes_and_its_rules(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch="qwen2moe", d_ff=96, dense_d_ff=160)
    hparams = read_hparams(open_part(info.path))
    assert (hparams.expert_d_ff, hparams.shared_expert_d_ff) == (96, 160)
    assert (hparams.rules.qkv_bias, hparams.rules.shared_expert) == (True, True)
    other = read_hparams(open_part(write_tiny_moe_gguf(tmp_path / "o.gguf", arch="qwen3moe").path))
    assert (other.rules.qkv_bias, other.rules.shared_expert, other.shared_expert_d_ff) == (False, False, 0)


def test_qwen2moe_expert_sizes_fall_back_to_feed_forward_length_as_llama_cpp_does(tmp_path):
    keys = {**BASE_KEYS, "feed_forward_length": 512}
    hparams = read_hparams(open_part(write_metadata(tmp_path / "m.gguf", "qwen2moe", keys)))
    assert (hparams.expert_d_ff, hparams.shared_expert_d_ff) == (256, 512)  # n_ff / k, n_ff


@pytest.mark.parametrize("present, missing", [
    ({}, "expert_feed_forward_length"),
    ({"expert_feed_forward_length": 96}, "expert_shared_feed_forward_length"),
])
def test_qwen2moe_without_its_expert_sizes_names_the_missing_key(tmp_path, present, missing):
    path = write_metadata(tmp_path / "m.gguf", "qwen2moe", {**BASE_KEYS, **present})
    with pytest.raises(UnsupportedModelError, match=rf"m\.gguf: metadata key qwen2moe\.{missing} is missing"):
        read_hparams(open_part(path))


def test_an_unsupported_architecture_error_lists_qwen2moe_among_the_supported(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"architecture 'dbrx' is not supported; supported: .*qwen2moe"):
        read_hparams(open_part(write_metadata(tmp_path / "g.gguf", "dbrx", BASE_KEYS)))
