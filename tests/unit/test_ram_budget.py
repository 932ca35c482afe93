"""RAM budget arithmetic: sizes, the dense part of a GGUF, the KV cache, and the cache slots a budget allows."""

from __future__ import annotations

import pytest
from gguf import GGUFReader

from mer.errors import ConfigError
from mer.model.model import MoEModel
from mer.runtime.ram_budget import (HEADROOM_NBYTES, MIB, dense_nbytes, kv_cache_nbytes, metadata_nbytes, parse_size, plan_cache_slots,
                            processes_nbytes)
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf
from tests.support.gguf_models import write_tiny_moe_gguf


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", 3 * 2**29),
                                            ("2GB", 2 * 10**9), ("4096", 4096), (" 64 kib ", 65536), ("3m", 3 * 2**20)])
def test_sizes_are_parsed_with_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "8XB", "", "1e9"])
def test_a_malformed_size_is_a_config_error_naming_it(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(text)


def test_dense_bytes_are_every_tensor_but_the_experts(tmp_path):
    for layout in ("merged", "per_expert"):
        info = write_tiny_moe_gguf(tmp_path / f"{layout}.gguf", layout=layout, dense_first_layer=True, n_layers=3)
        reader = GGUFReader(info.path)
        expected = sum(int(tensor.n_bytes) for tensor in reader.tensors
                       if not any(f"ffn_{name}_exps" in tensor.name or (f"ffn_{name}." in tensor.name
                                                                       and tensor.name.split(".")[-2].isdigit())
                                  for name in ("gate", "up", "down")))
        assert dense_nbytes(MoEModel.load(info.path).source) == expected
        assert 0 < expected < info.path.stat().st_size


def test_kv_cache_bytes_are_what_the_kv_cache_allocates(tmp_path):
    model = MoEModel.load(write_tiny_moe_gguf(tmp_path / "m.gguf", n_kv_heads=2).path)
    cache = model.new_kv_cache(37)
    hparams = model.hparams
    assert kv_cache_nbytes(hparams, 37) == cache.keys.nbytes + cache.values.nbytes == cache.nbytes


def test_an_mla_kv_cache_holds_the_compressed_form(tmp_path):
    """deepseek2: per position and block, kv_lora_rank + qk_rope float32 values (64 + 16), not the
    keys and values of every head (2 x 4 heads x 48); --ram-budget counts the same bytes."""
    info = write_tiny_deepseek2_gguf(tmp_path / "ds2.gguf", expert_dtype="f32", kv_lora_rank=64, qk_rope=16)
    model = MoEModel.load(info.path)
    cache = model.new_kv_cache(37)
    assert model.hparams.kv_floats_per_position == 64 + 16
    assert cache.nbytes == kv_cache_nbytes(model.hparams, 37) == info.n_layers * 37 * (64 + 16) * 4
    assert cache.values is None and cache.keys.shape == (info.n_layers, 37, 1, 80)


def test_metadata_counts_every_array_element_in_the_two_processes_that_parse_it(tmp_path):
    for vocab in (400, 800):
        source = MoEModel.load(write_tiny_moe_gguf(tmp_path / f"v{vocab}.gguf", vocab_size=vocab).path).source
        elements = metadata_nbytes(source) / 2 / 1024
        assert 3 * vocab <= elements <= 3 * vocab + 64  # tokens, scores, types (+ the scalar keys)


def test_the_gate_predictor_makes_the_predictor_a_heavy_process_that_parses_the_metadata(tmp_path):
    source = MoEModel.load(write_tiny_moe_gguf(tmp_path / "m.gguf", vocab_size=400).path).source
    assert metadata_nbytes(source, gate_predictor=True) == metadata_nbytes(source) * 3 // 2
    assert processes_nbytes(2, gate_predictor=True) - processes_nbytes(2) == 96 * MIB - 40 * MIB
    fixed = 12 * MIB + processes_nbytes(2, gate_predictor=True) + HEADROOM_NBYTES
    assert plan_cache_slots(fixed + 4 * 4 * MIB, **PLAN, gate_predictor=True).cache_slots == 2
    with pytest.raises(ConfigError, match="needs at least"):
        plan_cache_slots(fixed + 4 * 4 * MIB - 1, **PLAN, gate_predictor=True)


PLAN = dict(dense=10 * MIB, kv_cache=2 * MIB, num_compute_workers=2, slot_nbytes=4 * MIB, top_k=2, reserve_slots=2,
            num_experts=64)


def test_the_cache_gets_every_slot_left_by_the_fixed_part():
    fixed = 12 * MIB + processes_nbytes(2) + HEADROOM_NBYTES
    smallest = plan_cache_slots(fixed + 4 * 4 * MIB, **PLAN)
    assert smallest.cache_slots == 2 and smallest.arena_nbytes == 16 * MIB
    assert smallest.fixed_nbytes + smallest.arena_nbytes == fixed + 16 * MIB
    assert plan_cache_slots(fixed + 4 * 4 * MIB + 4 * MIB - 1, **PLAN).cache_slots == 2
    assert plan_cache_slots(fixed + 10 * 4 * MIB, **PLAN).cache_slots == 8
    assert plan_cache_slots(100 * 2**30, **PLAN).cache_slots == 64  # never more slots than experts
    assert smallest.num_processes == 7 and "2 + 2 slots" in smallest.describe()
    with_metadata = plan_cache_slots(fixed + 100 * MIB + 4 * 4 * MIB, **PLAN, metadata=100 * MIB)
    assert with_metadata.cache_slots == 2 and "GGUF metadata 100.0 MiB" in with_metadata.describe()
    assert HEADROOM_NBYTES == 512 * MIB and "headroom 512 MiB" in smallest.describe()


def test_a_budget_below_the_dense_part_plus_k_experts_is_refused_with_the_numbers():
    fixed = 12 * MIB + processes_nbytes(2) + HEADROOM_NBYTES
    with pytest.raises(ConfigError) as refused:
        plan_cache_slots(fixed + 4 * 4 * MIB - 1, **PLAN)
    message = str(refused.value)
    assert f"needs at least {(fixed + 16 * MIB) / MIB:,.1f} MiB" in message
    assert "dense weights 10.0 MiB" in message and "KV cache 2.0 MiB" in message
    assert "2 experts of one layer (2 x 4.00 MiB)" in message and "2 prefetch slots" in message
    with pytest.raises(ConfigError, match="needs at least"):
        plan_cache_slots(MIB, **{**PLAN, "reserve_slots": 0})
