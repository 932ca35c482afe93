"""Finding and checking the expert tensors of MoE GGUFs written with the `gguf` library."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from mer.errors import GGUFError, ShapeError, UnsupportedDTypeError
from mer.store.gguf_files import split_part_paths
from mer.store.gguf_identity import gguf_identity
from mer.store.gguf_source import read_gguf_source
from tests.support.gguf_models import ggml_type, random_weight_bytes, write_tiny_moe_gguf


def reader_tensor(path, name):
    return next(tensor for tensor in GGUFReader(path).tensors if tensor.name == name)


@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "olmoe"])
def test_geometry_and_layers_come_from_keys_and_tensors(tmp_path, arch):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch=arch, n_layers=3, n_experts=4, top_k=2,
                               d_model=96, d_ff=160, dtypes=("q8_0", "q8_0", "q4_0"))
    source = read_gguf_source(info.path)
    geometry = source.geometry
    assert (geometry.architecture, geometry.num_layers, geometry.num_moe_layers) == (arch, 3, 3)
    assert (geometry.experts_per_layer, geometry.top_k, geometry.d_model, geometry.d_ff) == (4, 2, 96, 160)
    assert [layer.block for layer in source.layers] == [0, 1, 2]
    assert all(layer.dtypes == ("q8_0", "q8_0", "q4_0") for layer in source.layers)
    gate, up, down = source.layers[0].matrices
    assert (gate.rows, gate.columns, up.rows, up.columns, down.rows, down.columns) == (160, 96, 160, 96, 96, 160)
    assert source.paths == (info.path,) and source.nbytes == info.path.stat().st_size


def test_qwen3moe_expert_length_key_wins_over_dense_feed_forward_length(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "q.gguf", arch="qwen3moe", d_ff=128, dense_d_ff=384)
    assert GGUFReader(info.path).get_field("qwen3moe.feed_forward_length").contents() == 384
    assert read_gguf_source(info.path).geometry.d_ff == 128


@pytest.mark.parametrize("layout", ["merged", "per_expert"])
def test_expert_bytes_are_the_tensor_bytes_of_that_expert(tmp_path, layout):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", layout=layout, dtypes=("q4_0", "f16", "q8_0"))
    source = read_gguf_source(info.path)
    tensors = {tensor.name: tensor for tensor in GGUFReader(info.path).tensors}
    for layer, block in zip(source.layers, info.moe_blocks):
        for expert in range(info.n_experts):
            for matrix, name in zip(layer.matrices, info.expert_tensor_names(block, expert)):
                tensor = tensors[name]
                expected = tensor.data[expert] if layout == "merged" else tensor.data
                assert matrix.merged == (layout == "merged")
                assert matrix.expert_bytes(expert)[1].tobytes() == expected.tobytes()


def test_dense_first_block_is_not_a_moe_layer(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "d.gguf", dense_first_layer=True, n_layers=3)
    source = read_gguf_source(info.path)
    assert (source.geometry.num_layers, source.geometry.num_moe_layers) == (3, 2)
    assert [(layer.moe_layer, layer.block) for layer in source.layers] == [(0, 1), (1, 2)]


def test_dtypes_may_differ_per_matrix_and_per_layer(tmp_path):
    mixes = [("q4_k", "q4_k", "q6_k"), ("q5_k", "q4_k", "q4_k")]
    info = write_tiny_moe_gguf(tmp_path / "k.gguf", d_model=256, d_ff=256, layer_dtypes=mixes)
    source = read_gguf_source(info.path)
    assert [layer.dtypes for layer in source.layers] == mixes
    assert source.expert_format(0).down.dtype == "q6_k" and source.expert_format(1).gate.dtype == "q5_k"


def test_split_model_is_read_as_one_from_any_part(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "s.gguf", split=3)
    assert [path.name for path in info.paths] == [f"s-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = write_tiny_moe_gguf(tmp_path / "whole.gguf")
    for part in info.paths:
        source = read_gguf_source(part)
        assert source.paths == info.paths
        assert source.geometry == read_gguf_source(whole.path).geometry
    parts_holding_experts = {matrix.tensors[0].path for layer in source.layers for matrix in layer.matrices}
    assert len(parts_holding_experts) > 1


def test_missing_split_part_is_named(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "s.gguf", split=3)
    info.paths[2].unlink()
    with pytest.raises(GGUFError, match="missing .*s-00003-of-00003.gguf"):
        read_gguf_source(info.paths[0])


def test_split_keys_must_match_the_file_names(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "s.gguf", split=2)
    renamed = tmp_path / "alone.gguf"
    shutil.copy(info.paths[0], renamed)
    with pytest.raises(GGUFError, match=r"alone.gguf: split.count=2, split.no=0, but it is part 1 of 1"):
        read_gguf_source(renamed)
    assert split_part_paths(tmp_path / "plain.gguf") == (tmp_path / "plain.gguf",)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is a text file, not a model\n")
    with pytest.raises(GGUFError, match=r"notes.gguf: not a GGUF file \(starts with b'this'"):
        read_gguf_source(path)
    with pytest.raises(GGUFError, match="no such GGUF file"):
        read_gguf_source(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep_fraction", [0.5, 0.99, 0.01])
def test_truncated_file(tmp_path, keep_fraction):
    info = write_tiny_moe_gguf(tmp_path / "t.gguf")
    data = info.path.read_bytes()
    info.path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(GGUFError, match=r"t.gguf: truncated or corrupt GGUF file \(\d+ bytes\)"):
        read_gguf_source(info.path)


def write_gguf(path, tensors, arch="llama", **keys):
    """A GGUF with the given tensors {name: (array, raw GGML type or None)} and uint32 keys."""
    writer = GGUFWriter(path, arch)
    for key, value in keys.items():
        writer.add_uint32(f"{arch}.{key}", value)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MOE_KEYS = dict(block_count=1, embedding_length=64, expert_count=4, expert_used_count=2, feed_forward_length=128)


def expert_tensors(rng, gate=(4, 128, 64), up=(4, 128, 64), down=(4, 64, 128), dtypes=("q4_0",) * 3, block=0):
    """Merged expert tensors of one block with numpy shapes (experts, rows, columns)."""
    return {f"blk.{block}.ffn_{name}_exps.weight": (random_weight_bytes(rng, dtype, shape, 0.1), ggml_type(dtype))
            for name, shape, dtype in zip(("gate", "up", "down"), (gate, up, down), dtypes)}


def test_model_without_experts_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    dense = {"blk.0.ffn_gate.weight": (rng.standard_normal((128, 64), dtype=np.float32), None)}
    path = write_gguf(tmp_path / "dense.gguf", dense, **MOE_KEYS)
    with pytest.raises(GGUFError, match="dense.gguf: no MoE expert tensors"):
        read_gguf_source(path)


def test_other_architecture_with_dense_block_and_shared_experts(tmp_path):
    rng = np.random.default_rng(6)
    tensors = {f"blk.0.ffn_{name}.weight": (rng.standard_normal(shape, dtype=np.float32), None)
               for name, shape in (("gate", (512, 64)), ("up", (512, 64)), ("down", (64, 512)))}
    tensors.update({f"blk.1.ffn_{name}_shexp.weight": (rng.standard_normal(shape, dtype=np.float32), None)
                    for name, shape in (("gate", (256, 64)), ("up", (256, 64)), ("down", (64, 256)))})
    tensors.update(expert_tensors(rng, block=1))
    keys = dict(MOE_KEYS, block_count=2, feed_forward_length=512, expert_feed_forward_length=128)
    source = read_gguf_source(write_gguf(tmp_path / "ds.gguf", tensors, arch="deepseek2", **keys))
    geometry = source.geometry
    assert (geometry.architecture, geometry.num_layers, geometry.num_moe_layers) == ("deepseek2", 2, 1)
    assert geometry.d_ff == 128
    assert [layer.block for layer in source.layers] == [1]
    used = {tensor.name for matrix in source.layers[0].matrices for tensor in matrix.tensors}
    assert used == {f"blk.1.ffn_{name}_exps.weight" for name in ("gate", "up", "down")}


def test_fused_gate_up_expert_tensor_is_refused(tmp_path):
    rng = np.random.default_rng(7)
    tensors = expert_tensors(rng)
    tensors["blk.0.ffn_gate_up_exps.weight"] = tensors.pop("blk.0.ffn_gate_exps.weight")
    with pytest.raises(GGUFError, match=r"blk.0.ffn_gate_up_exps.weight: fused gate\+up expert tensors"):
        read_gguf_source(write_gguf(tmp_path / "fused.gguf", tensors, **MOE_KEYS))


@pytest.mark.parametrize("dtype", ["q5_0", "q4_1", "q5_1"])
def test_unsupported_dtype_names_tensor_and_type(tmp_path, dtype):
    tensors = expert_tensors(np.random.default_rng(2), dtypes=("q4_0", dtype, "q4_0"))
    path = write_gguf(tmp_path / "odd.gguf", tensors, **MOE_KEYS)
    with pytest.raises(UnsupportedDTypeError, match=f"unsupported tensor type {dtype.upper()} in .*odd.gguf: "
                                                     f"tensor blk.0.ffn_up_exps.weight"):
        read_gguf_source(path)


def test_up_of_another_shape_than_gate_is_refused(tmp_path):
    tensors = expert_tensors(np.random.default_rng(3), up=(4, 96, 64))
    path = write_gguf(tmp_path / "bad.gguf", tensors, **MOE_KEYS)
    with pytest.raises(ShapeError, match=r"blk.0.ffn_up_exps.weight is 96 rows x 64 columns.* must be 128 x 64"):
        read_gguf_source(path)


def test_keys_must_agree_with_tensor_shapes(tmp_path):
    rng = np.random.default_rng(4)
    path = write_gguf(tmp_path / "ff.gguf", expert_tensors(rng), **{**MOE_KEYS, "feed_forward_length": 256})
    with pytest.raises(ShapeError, match="feed_forward_length is 256, but tensor blk.0.ffn_gate_exps.weight has d_ff"):
        read_gguf_source(path)
    path = write_gguf(tmp_path / "e.gguf", expert_tensors(rng), **{**MOE_KEYS, "expert_count": 8})
    with pytest.raises(ShapeError, match="blk.0.ffn_gate_exps.weight holds 4 experts, expert_count is 8"):
        read_gguf_source(path)
    path = write_gguf(tmp_path / "d.gguf", expert_tensors(rng), **{**MOE_KEYS, "embedding_length": 128})
    with pytest.raises(ShapeError, match="d_model 64, llama.embedding_length is 128"):
        read_gguf_source(path)
    keys = {key: value for key, value in MOE_KEYS.items() if key != "expert_used_count"}
    path = write_gguf(tmp_path / "k.gguf", expert_tensors(rng), **keys)
    with pytest.raises(GGUFError, match="k.gguf: metadata key llama.expert_used_count is missing"):
        read_gguf_source(path)


def test_inconsistent_expert_length_key_is_refused(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "q.gguf", arch="qwen3moe", d_ff=128,
                               metadata_overrides={"qwen3moe.expert_feed_forward_length": 64})
    with pytest.raises(ShapeError, match="qwen3moe.expert_feed_forward_length is 64"):
        read_gguf_source(info.path)


def test_missing_matrix_and_missing_per_expert_tensor_are_named(tmp_path):
    rng = np.random.default_rng(5)
    tensors = expert_tensors(rng)
    del tensors["blk.0.ffn_down_exps.weight"]
    with pytest.raises(GGUFError, match="block 0 has expert tensors .* but no ffn_down expert tensor"):
        read_gguf_source(write_gguf(tmp_path / "nodown.gguf", tensors, **MOE_KEYS))
    per_expert = {}
    for name, (array, raw_dtype) in zip(("gate", "up", "down"), expert_tensors(rng).values()):
        for expert in range(4):
            per_expert[f"blk.0.ffn_{name}.{expert}.weight"] = (array[expert], raw_dtype)
    del per_expert["blk.0.ffn_up.2.weight"]
    with pytest.raises(GGUFError, match=r"blk.0.ffn_up.2.weight is missing"):
        read_gguf_source(write_gguf(tmp_path / "gap.gguf", per_expert, **MOE_KEYS))


def test_identity_is_stable_and_changes_with_any_tensor_byte(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf")
    identity = gguf_identity(info.path)
    assert len(identity) == 64 and identity == gguf_identity([info.path])
    copy = tmp_path / "copy.gguf"
    shutil.copy(info.path, copy)
    assert gguf_identity(copy) == identity
    for name in ("blk.1.ffn_down_exps.weight", "output.weight"):
        shutil.copy(info.path, copy)
        offset = reader_tensor(copy, name).data_offset + 7
        data = bytearray(copy.read_bytes())
        data[offset] ^= 0x01
        copy.write_bytes(bytes(data))
        assert gguf_identity(copy) != identity, name
    other_seed = write_tiny_moe_gguf(tmp_path / "seed1.gguf", seed=1)
    assert gguf_identity(other_seed.path) != identity


def test_identity_of_split_model_from_first_part_or_list(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "s.gguf", split=2)
    assert gguf_identity(info.paths[0]) == gguf_identity(list(info.paths))
    with pytest.raises(GGUFError, match="part 1 of 1"):
        gguf_identity([info.paths[0]])
