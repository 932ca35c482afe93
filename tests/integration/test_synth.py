"""Synthetic stores written to real files: determinism, manifest, validity, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize

from mer.errors import ConfigError, ShapeError, StoreExistsError
from mer.compute.expert_format import PAGE_SIZE
from tests.support.quant_helpers import scale_ranges
from mer.store.checksum import payload_checksum
from mer.store.reader import ExpertStore
from mer.store.synth import SynthSpec, synth_store
from tests.support.synth_payloads import expert_payload

# 2 layers x 4 experts; a q4_0 payload of 13,824 bytes, so each expert is padded to 16,384
SMALL = SynthSpec(num_layers=2, experts_per_layer=4, top_k=2, d_model=64, d_ff=128, dtypes=("q4_0",) * 3, seed=1)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.suffix == ".bin"}


def test_same_seed_gives_byte_identical_stores(tmp_path):
    synth_store(SMALL, tmp_path / "a")
    synth_store(SMALL, tmp_path / "b")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_a["experts"] == manifest_b["experts"]


def test_a_different_seed_changes_every_expert(tmp_path):
    first = ExpertStore.open(synth_store(SMALL, tmp_path / "a").out).manifest
    other_spec = SynthSpec(**{**SMALL.__dict__, "seed": 2})
    second = ExpertStore.open(synth_store(other_spec, tmp_path / "b").out).manifest
    assert all(a.checksum != b.checksum for a, b in zip(first.experts, second.experts))


def test_manifest_geometry_ids_offsets_checksums_and_source(tmp_path):
    result = synth_store(SMALL, tmp_path / "store")
    store = ExpertStore.open(result.out)
    manifest = store.manifest
    geometry = manifest.geometry
    assert (geometry.num_moe_layers, geometry.experts_per_layer, geometry.top_k) == (2, 4, 2)
    assert (geometry.d_model, geometry.d_ff, geometry.num_experts) == (64, 128, 8)
    payload_nbytes = 3 * 64 * 128 // 32 * 18
    assert manifest.layers[0].format.payload_nbytes == payload_nbytes == 13824
    assert manifest.layers[0].expert_stride == manifest.slot_nbytes == 4 * PAGE_SIZE
    assert [(e.id, e.moe_layer, e.expert) for e in manifest.experts] == [(i, i // 4, i % 4) for i in range(8)]
    assert [e.offset for e in manifest.experts] == [(i % 4) * 4 * PAGE_SIZE for i in range(8)]
    assert manifest.source.kind == "synth"
    assert manifest.source.parameters["seed"] == 1
    assert manifest.source.parameters["dtypes"] == ["q4_0"] * 3
    assert (result.num_experts, result.payload_nbytes, result.nbytes) == (8, 8 * 13824, 8 * 4 * PAGE_SIZE)
    checksums = set()
    for expert_id in range(8):
        expected = expert_payload(SMALL, expert_id)
        np.testing.assert_array_equal(store.read_payload(expert_id).data, expected)
        assert manifest.expert(expert_id).checksum == payload_checksum(expected)
        checksums.add(manifest.expert(expert_id).checksum)
    assert len(checksums) == 8  # every expert differs


def test_mixed_k_quant_store_is_valid_with_scales_in_range(tmp_path):
    spec = SynthSpec(num_layers=1, experts_per_layer=2, top_k=1, d_model=256, d_ff=512,
                     dtypes=("q4_k", "q5_k", "q6_k"), seed=3)
    store = ExpertStore.open(synth_store(spec, tmp_path / "store").out)
    expert_format = store.manifest.layers[0].format
    assert [m.dtype for m in expert_format.matrices] == ["q4_k", "q5_k", "q6_k"]
    for expert_id in range(2):
        payload = store.read_payload(expert_id)
        for matrix in expert_format.matrices:
            raw = payload.matrix_bytes(matrix).reshape(matrix.rows, -1)
            weights = dequantize(raw, matrix.dtype_info.ggml_type)
            assert weights.shape == (matrix.rows, matrix.columns) and np.isfinite(weights).all()
            assert weights.std() == pytest.approx(matrix.columns**-0.5, rel=0.15)
            d_offset = 208 if matrix.dtype == "q6_k" else 0
            d = raw.reshape(-1, matrix.dtype_info.type_size)[:, d_offset : d_offset + 2].copy().view(np.float16)
            assert scale_ranges(matrix.dtype, matrix.columns**-0.5)["d"].contains(d.astype(np.float64)).all()


def test_shapes_not_a_multiple_of_the_block_are_refused_before_writing(tmp_path):
    for field, value, dtype in [("d_model", 100, "q4_0"), ("d_ff", 384, "q4_k"), ("d_model", 0, "f16")]:
        spec = SynthSpec(**{**SMALL.__dict__, "d_model": 256, field: value, "dtypes": (dtype,) * 3})
        with pytest.raises(ShapeError, match=f"{field} {value} is not a positive multiple of the {dtype}"):
            synth_store(spec, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_bad_counts_and_dtypes_are_config_errors(tmp_path):
    for change, message in [({"num_layers": 0}, "num_layers"), ({"top_k": 5}, "top_k 5 exceeds"),
                            ({"seed": -1}, "seed"), ({"layout": "tiled"}, "layout")]:
        with pytest.raises(ConfigError, match=message):
            synth_store(SynthSpec(**{**SMALL.__dict__, **change}), tmp_path / "store")
    with pytest.raises(Exception, match="unsupported dtype 'q3_k'"):
        synth_store(SynthSpec(**{**SMALL.__dict__, "dtypes": ("q3_k",) * 3}), tmp_path / "store")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "store"
    synth_store(SMALL, out)
    before = file_bytes(out)
    with pytest.raises(StoreExistsError, match="--force"):
        synth_store(SynthSpec(**{**SMALL.__dict__, "seed": 9}), out)
    assert file_bytes(out) == before
    synth_store(SynthSpec(**{**SMALL.__dict__, "seed": 9}), out, force=True)
    assert file_bytes(out) != before
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no partial directory left behind


def test_progress_phases_cover_every_byte(tmp_path):
    phases: dict[str, list[int]] = {}

    def start_phase(description: str, total: int):
        phases[description] = [total, 0]
        return lambda nbytes: phases[description].__setitem__(1, phases[description][1] + nbytes)

    synth_store(SMALL, tmp_path / "store", start_phase=start_phase)
    assert phases == {"writing": [8 * 13824, 8 * 13824], "verifying": [8 * 13824, 8 * 13824]}


def test_presets_and_overrides():
    mixtral = SynthSpec.from_preset("mixtral-8x7b")
    assert mixtral.expert_format().payload_nbytes == 99_090_432
    assert mixtral.geometry().num_experts == 256 and mixtral.top_k == 2
    qwen = SynthSpec.from_preset("qwen3-30b-a3b", num_layers=2, dtypes=("q8_0",) * 3, seed=4)
    assert (qwen.num_layers, qwen.experts_per_layer, qwen.top_k, qwen.d_model, qwen.d_ff) == (2, 128, 8, 2048, 768)
    assert (qwen.dtypes, qwen.seed, qwen.preset) == (("q8_0",) * 3, 4, "qwen3-30b-a3b")
    olmoe = SynthSpec.from_preset("olmoe")
    assert (olmoe.num_layers, olmoe.experts_per_layer, olmoe.top_k, olmoe.d_model, olmoe.d_ff) == (16, 64, 8, 2048, 1024)
    for name in ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe", "tiny"):
        SynthSpec.from_preset(name).validate()
    with pytest.raises(ConfigError, match="unknown preset 'gpt4'"):
        SynthSpec.from_preset("gpt4")


def test_planar_layout(tmp_path):
    spec = SynthSpec(**{**SMALL.__dict__, "layout": "planar"})
    if importlib.util.find_spec("mer.quant.planar") is None:
        with pytest.raises(ConfigError, match="planar"):
            synth_store(spec, tmp_path / "store")
        assert not (tmp_path / "store").exists()
        return
    from mer.quant.planar import to_planar

    store = ExpertStore.open(synth_store(spec, tmp_path / "store").out)
    assert store.manifest.layout == "planar"
    assert all(m.layout == "planar" for m in store.manifest.layers[0].format.matrices)
    native = expert_payload(SMALL, 5)
    planar = store.read_payload(5)
    for matrix in planar.format.matrices:
        expected = to_planar(matrix.dtype, native[matrix.offset : matrix.offset + matrix.nbytes], matrix.rows,
                             matrix.columns)
        np.testing.assert_array_equal(planar.matrix_bytes(matrix), np.asarray(expected).reshape(-1).view(np.uint8))
