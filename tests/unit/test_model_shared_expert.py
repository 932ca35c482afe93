"""qwen2moe's shared expert and q/k/v biases (`mer.model.shared_expert`, `mer.model.weights`): numbers
against plain numpy on tensors read with the `gguf` library alone, its share of the block's output,
residency (the router's copy, counted as dense by the RAM budget, never in the expert store), and
clear errors for a missing tensor. Parity of the whole model with llama.cpp: test_llama_parity.py."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from mer.errors import GGUFError, UnsupportedModelError
from mer.model.attention import next_positions
from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.model import MoEModel
from mer.model.moe import combine_experts, expert_batches, group_by_expert
from mer.runtime.ram_budget import dense_nbytes
from tests.support.gguf_models import write_tiny_moe_gguf

SHARED_TENSORS = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


@pytest.fixture(scope="module")
def qwen2moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2moe") / "m.gguf"
    return write_tiny_moe_gguf(path, arch="qwen2moe", dtypes=("f32",) * 3, n_layers=2, n_experts=8, top_k=2,
                               d_model=64, d_ff=96, dense_d_ff=160, vocab_size=384, tokenizer="bpe", seed=4)


def gguf_tensors(path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Every f32 tensor as float64, numpy shape = GGML shape reversed (read by `gguf` alone)."""
    return {tensor.name: np.asarray(tensor.data, dtype=np.float64).reshape(
        tuple(reversed([int(n) for n in tensor.shape]))) for tensor in gguf.GGUFReader(path).tensors}


def test_the_shared_expert_is_a_sigmoid_gated_swiglu(qwen2moe):
    model, tensors = MoEModel.load(qwen2moe.path), gguf_tensors(qwen2moe.path)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    for block in range(2):
        t = lambda name: tensors[f"blk.{block}.{name}.weight"]  # noqa: E731
        gate, up = x @ t("ffn_gate_shexp").T, x @ t("ffn_up_shexp").T
        swiglu = (gate / (1 + np.exp(-gate)) * up) @ t("ffn_down_shexp").T
        sigmoid = 1 / (1 + np.exp(-(x @ t("ffn_gate_inp_shexp"))))
        assert np.ptp(sigmoid) > 0.3  # a gate that varies from token to token
        ours = model.shared_expert(block, x)
        np.testing.assert_allclose(ours, swiglu * sigmoid[:, None], rtol=0, atol=1e-5 * np.abs(ours).max())
    assert model.weights.blocks[0].shared_expert.gate.rows == 160  # expert_shared_feed_forward_length


def test_the_biases_and_the_shared_expert_shape_the_logits(qwen2moe):
    """Each of them moves the logits by far more than the parity tolerances (so parity tests them)."""
    model = MoEModel.load(qwen2moe.path)
    tokens = [5, 17, 100, 200, 33]
    full = forward(model, tokens, model.new_kv_cache(8), GGUFExperts(model.source)).logits
    blocks = model.weights.blocks
    for change in ({"shared_expert": None}, {"qkv_bias": None}):
        stripped = dataclasses.replace(model, weights=dataclasses.replace(
            model.weights, blocks=tuple(dataclasses.replace(block, **change) for block in blocks)))
        logits = forward(stripped, tokens, stripped.new_kv_cache(8), GGUFExperts(model.source)).logits
        assert np.abs(logits - full).max() / np.abs(full).max() > 0.05, change


def test_the_shared_expert_weighs_as_much_as_the_routed_experts(qwen2moe):
    model = MoEModel.load(qwen2moe.path)
    cache = model.new_kv_cache(4)
    hidden = model.attention_block(0, model.embed([5, 6, 7, 8]), cache, next_positions(cache, 0, 4))
    normed = model.ffn_input(0, hidden)
    routing = model.route(0, normed)
    groups = group_by_expert(routing)
    routed = combine_experts(routing, groups, GGUFExperts(model.source)(0, expert_batches(normed, groups)), 64)
    shared = model.shared_expert(0, normed)
    assert shared.shape == (4, 64) and 0.2 < np.linalg.norm(shared) / np.linalg.norm(routed) < 5


def test_the_shared_expert_is_resident_dense_weight_and_not_in_the_store(qwen2moe):
    mapped, resident = MoEModel.load(qwen2moe.path), MoEModel.load(qwen2moe.path, resident=True)
    file_bytes = mapped.source.parts[0].reader.data
    for block in range(2):
        copy = resident.weights.blocks[block].shared_expert
        for matrix in (copy.gate_input, copy.gate, copy.up, copy.down):
            assert not np.shares_memory(matrix.tensor.data, file_bytes)
    tensors = mapped.source.parts[0].tensors
    shared = sum(tensor.nbytes for tensor in tensors if tensor.name.split(".")[-2] in SHARED_TENSORS)
    experts = sum(tensor.nbytes for tensor in tensors if tensor.name.endswith("_exps.weight"))
    assert shared == 2 * 4 * (64 + 3 * 64 * 160)  # f32, both blocks
    assert dense_nbytes(mapped.source) == sum(tensor.nbytes for tensor in tensors) - experts  # shared included
    assert mapped.source.expert_format(0).payload_nbytes == 3 * 4 * 64 * 96  # a store payload: one expert only


@pytest.mark.parametrize("missing", ["blk.1.ffn_gate_inp_shexp.weight", "blk.0.ffn_down_shexp.weight",
                                     "blk.0.attn_k.bias"])
def test_a_missing_qwen2moe_tensor_is_named(tmp_path, missing):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch="qwen2moe", n_layers=2, omit_tensors=(missing,))
    with pytest.raises(UnsupportedModelError, match=rf"m\.gguf: tensor {missing.replace('.', '[.]')} is missing"):
        MoEModel.load(info.path)


def test_shared_expert_tensors_in_another_architecture_are_refused(tmp_path):
    """A qwen3moe file that carries a shared expert would silently lose it: refused, naming the tensor."""
    info = write_tiny_moe_gguf(tmp_path / "q2.gguf", arch="qwen2moe", n_layers=1)
    reader = gguf.GGUFReader(info.path)
    writer = gguf.GGUFWriter(tmp_path / "q3.gguf", "qwen3moe")
    for field in reader.fields.values():  # the hyper-parameters under the qwen3moe prefix
        if field.name.startswith("qwen2moe."):
            name, value = field.name.replace("qwen2moe.", "qwen3moe."), field.contents()
            if isinstance(value, int):
                writer.add_uint32(name, value)
            else:
                writer.add_float32(name, value)
    for tensor in reader.tensors:
        if not tensor.name.endswith(".bias"):
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    for name in ("attn_q_norm", "attn_k_norm"):
        writer.add_tensor(f"blk.0.{name}.weight", np.ones(16, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"tensor blk\.0\.ffn_\w+_shexp\.weight is not supported"):
        MoEModel.load(tmp_path / "q3.gguf")


def test_expert_sizes_from_llama_cpps_defaults_must_match_the_tensors(tmp_path):
    """Without expert_feed_forward_length llama.cpp takes feed_forward_length / k for the experts."""
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch="qwen2moe", d_ff=128, dense_d_ff=128,
                               omit_keys=("qwen2moe.expert_feed_forward_length",))
    with pytest.raises(GGUFError, match=r"m\.gguf: the metadata gives the experts a hidden size of 64 .* the "
                                        r"expert tensors have 128"):
        MoEModel.load(info.path)
