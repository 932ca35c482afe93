"""Converting tiny MoE GGUFs (written with the `gguf` library) into expert stores, checked byte for byte."""

from __future__ import annotations

import hashlib
import subprocess
import zlib
from pathlib import Path

import pytest
from gguf import GGUFReader

import mer.store.writer
from mer.errors import DiskSpaceError, GGUFError, StoreExistsError, UnsupportedDTypeError
from mer.store.convert import convert_gguf
from mer.store.gguf_identity import gguf_identity
from mer.store.reader import ExpertStore
from mer.store.verify import find_bad_experts
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.quant_helpers import from_planar

MODELS = {
    "mixtral-q4_0": dict(arch="llama", dtypes=("q4_0",) * 3),
    "qwen3moe-q8_0": dict(arch="qwen3moe", dtypes=("q8_0",) * 3, n_layers=3),
    "olmoe-f16": dict(arch="olmoe", dtypes=("f16",) * 3),
    "qwen3moe-q4_k_m": dict(arch="qwen3moe", d_model=256, d_ff=256,
                            layer_dtypes=[("q4_k", "q4_k", "q6_k"), ("q4_k", "q5_k", "q4_k")]),
    "mixtral-floats-per-expert": dict(arch="llama", layout="per_expert", dtypes=("bf16", "f32", "f16")),
    "mixtral-q4_0-per-expert": dict(arch="llama", layout="per_expert", n_experts=3),
    "olmoe-split": dict(arch="olmoe", dtypes=("q8_0", "q8_0", "q4_0"), split=3),
    "dense-first-block": dict(arch="llama", dense_first_layer=True, n_layers=3, d_model=128, d_ff=256),
}


def gguf_tensors(info) -> dict:
    return {tensor.name: tensor for path in info.paths for tensor in GGUFReader(path).tensors}


def gguf_expert_bytes(info, tensors: dict, block: int, expert: int) -> bytes:
    """gate ‖ up ‖ down of one expert, sliced independently from GGUFReader's tensor arrays."""
    pieces = []
    for name in info.expert_tensor_names(block, expert):
        data = tensors[name].data
        pieces.append((data[expert] if info.layout == "merged" else data).tobytes())
    return b"".join(pieces)


def reference_identity(paths) -> str:
    """The documented source hash, recomputed here from GGUFReader's view of each part."""
    digest = hashlib.sha256()
    for path in paths:
        reader = GGUFReader(path)
        digest.update(Path(path).read_bytes()[: reader.data_offset])
        for tensor in reader.tensors:
            digest.update((zlib.crc32(tensor.data.tobytes()) & 0xFFFFFFFF).to_bytes(4, "big"))
    return digest.hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if ".partial" in entry.name or entry.name == "store")


@pytest.mark.parametrize("model", MODELS)
def test_store_payloads_are_the_exact_gguf_bytes(tmp_path, model):
    info = write_tiny_moe_gguf(tmp_path / "model.gguf", **MODELS[model])
    phases: dict[str, list[int]] = {}

    def start_phase(description: str, total: int):
        phases[description] = [total]
        return phases[description].append

    result = convert_gguf(info.path, tmp_path / "store", start_phase=start_phase)
    store = ExpertStore.open(tmp_path / "store")
    tensors = gguf_tensors(info)
    manifest = store.manifest
    geometry = manifest.geometry
    assert (geometry.architecture, geometry.num_layers, geometry.num_moe_layers) == (
        info.arch, info.n_layers, info.num_moe_layers)
    assert (geometry.experts_per_layer, geometry.top_k, geometry.d_model, geometry.d_ff) == (
        info.n_experts, info.top_k, info.d_model, info.d_ff)
    assert [layer.block for layer in manifest.layers] == list(info.moe_blocks)
    assert [tuple(m.dtype for m in layer.format.matrices) for layer in manifest.layers] == list(info.layer_dtypes)
    for layer in manifest.layers:
        for expert in range(info.n_experts):
            expert_id = manifest.expert_id(layer.moe_layer, expert)
            payload = store.read_payload(expert_id).data.tobytes()
            assert payload == gguf_expert_bytes(info, tensors, layer.block, expert), manifest.describe(expert_id)
            assert manifest.expert(expert_id).checksum == f"{zlib.crc32(payload):08x}"
    assert find_bad_experts(store.directory, manifest) == []
    assert manifest.layout == "native" and manifest.source.kind == "gguf"
    assert manifest.source.paths == tuple(str(path.resolve()) for path in info.paths)
    assert manifest.source.nbytes == sum(path.stat().st_size for path in info.paths)
    assert manifest.source.hash == result.source_hash == reference_identity(info.paths) == gguf_identity(info.path)
    assert result.num_experts == geometry.num_experts and result.nbytes == manifest.total_payload_nbytes()
    assert list(phases) == ["copying", "verifying"]
    for total, *advances in phases.values():
        assert total == sum(advances) == result.nbytes and len(advances) == geometry.num_experts


def test_changed_gguf_gets_a_different_source_hash(tmp_path):
    first = convert_gguf(write_tiny_moe_gguf(tmp_path / "a.gguf", seed=1).path, tmp_path / "a")
    second = convert_gguf(write_tiny_moe_gguf(tmp_path / "b.gguf", seed=2).path, tmp_path / "b")
    again = convert_gguf(write_tiny_moe_gguf(tmp_path / "c.gguf", seed=1).path, tmp_path / "c")
    assert first.source_hash != second.source_hash and first.source_hash == again.source_hash


def test_existing_output_needs_force_and_force_replaces_it(tmp_path):
    old = write_tiny_moe_gguf(tmp_path / "old.gguf", seed=1)
    new = write_tiny_moe_gguf(tmp_path / "new.gguf", seed=2, n_layers=3)
    out = tmp_path / "store"
    convert_gguf(old.path, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(StoreExistsError, match="store: output already exists"):
        convert_gguf(new.path, out)
    assert (out / "manifest.json").read_text() == before
    convert_gguf(new.path, out, force=True)
    assert ExpertStore.open(out).manifest.geometry.num_moe_layers == 3
    assert leftovers(tmp_path) == ["store"]


def test_force_does_not_replace_a_directory_that_is_not_a_store(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreExistsError, match="home: exists and is not an expert store"):
        convert_gguf(info.path, precious, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_bad_inputs_leave_nothing_behind(tmp_path):
    text = tmp_path / "text.gguf"
    text.write_text("not a model")
    odd = write_tiny_moe_gguf(tmp_path / "odd.gguf", dtypes=("q4_0", "q5_0", "q4_0"))
    cut = write_tiny_moe_gguf(tmp_path / "cut.gguf")
    cut.path.write_bytes(cut.path.read_bytes()[:-5000])
    out = tmp_path / "store"
    for path, error in ((text, GGUFError), (odd.path, UnsupportedDTypeError), (cut.path, GGUFError)):
        with pytest.raises(error, match=path.name):
            convert_gguf(path, out)
        assert leftovers(tmp_path) == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/small (needs root and permission to mount)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_free_space_is_checked_before_writing(tmp_path, small_filesystem):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf")
    expected = r"small: the store needs 0.00 GiB \(\+64 MiB margin\), only 0.00 GiB free"
    with pytest.raises(DiskSpaceError, match=expected):
        convert_gguf(info.path, small_filesystem / "store")
    assert list(small_filesystem.iterdir()) == []


def test_filesystem_filling_up_while_writing(tmp_path, small_filesystem, monkeypatch):
    monkeypatch.setattr(mer.store.writer, "check_free_space", lambda directory, needed: None)
    info = write_tiny_moe_gguf(tmp_path / "big.gguf", dtypes=("f32",) * 3, d_model=128, d_ff=256)  # 3 MiB of experts
    expected = (r"small/store: the disk is full: no space left while writing \S*/small/\.store\.partial-\d+-\d+/"
                r"experts-00\d\.bin; the partial store was removed$")  # names the store and the file
    with pytest.raises(DiskSpaceError, match=expected):
        convert_gguf(info.path, small_filesystem / "store")
    assert list(small_filesystem.iterdir()) == []


def test_planar_layout_round_trips_to_the_gguf_bytes(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "k.gguf", d_model=256, d_ff=256,
                               layer_dtypes=[("q4_0", "q8_0", "f16"), ("q4_k", "q5_k", "q6_k")])
    convert_gguf(info.path, tmp_path / "store", layout="planar")
    store = ExpertStore.open(tmp_path / "store")
    tensors = gguf_tensors(info)
    assert store.manifest.layout == "planar"
    for layer in store.manifest.layers:
        for expert in range(info.n_experts):
            payload = store.read_payload(store.manifest.expert_id(layer.moe_layer, expert))
            native = b"".join(
                from_planar(matrix.dtype, payload.matrix_bytes(matrix), matrix.rows, matrix.columns).tobytes()
                for matrix in layer.format.matrices
            )
            assert all(matrix.layout == "planar" for matrix in layer.format.matrices)
            assert native == gguf_expert_bytes(info, tensors, layer.block, expert)
            if layer.moe_layer == 0:  # q4_0 gate: the planar bytes really are permuted
                gate = layer.format.gate
                assert payload.matrix_bytes(gate).tobytes() != native[: gate.nbytes]
