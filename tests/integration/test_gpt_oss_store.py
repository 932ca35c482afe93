"""gpt-oss experts in the expert store: biases and activation travel in the payload and the manifest.

A tiny gpt-oss GGUF (MXFP4 experts, q8_0 attention; `tests/support/gpt_oss_models.py`) is converted
(`convert_gguf`, native and planar); checked: every layer's format records the biases and the
clamped SwiGLU, each payload is the GGUF's matrix bytes then its f32 biases (compared with the
tensors read by `gguf.GGUFReader`, an independent reader), and a forward pass with the experts
read from the store (`StoreExperts`) gives the same logits, bit for bit, as one computing on the
GGUF's bytes; an expert's d_ff slices sum to its whole output (the down bias counted once).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mer.compute.batches import expert_outputs, item_partials, pack_batches
from mer.compute.expert_activation import swiglu_oai
from mer.compute.slicing import plan_slices
from mer.compute.swiglu import swiglu_expert
from mer.model.experts import GGUFExperts, StoreExperts
from mer.model.forward import forward
from mer.model.model import MoEModel
from mer.store.convert import convert_gguf
from mer.store.reader import ExpertStore
from tests.support.gpt_oss_models import write_tiny_gpt_oss_gguf


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt-oss-store")
    return write_tiny_gpt_oss_gguf(directory / "gpt-oss.gguf", d_ff=256, seed=5).path


def test_swiglu_oai_is_the_clamped_formula():
    gate = np.array([-20, -7.5, -1, 0, 0.5, 6.9, 7, 7.1, 30], dtype=np.float32)
    up = np.array([-30, -7.1, -7, -1, 0, 1, 6.9, 7.2, 40], dtype=np.float32)
    x, y = np.minimum(gate.astype(np.float64), 7), np.clip(up.astype(np.float64), -7, 7)
    expected = x / (1 + np.exp(-1.702 * x)) * (y + 1)
    np.testing.assert_allclose(swiglu_oai(gate, up), expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("layout", ["native", "planar"])
def test_payloads_hold_the_matrices_then_the_biases(model_path, tmp_path, layout):
    convert_gguf(model_path, tmp_path / "store", layout=layout)
    store = ExpertStore.open(tmp_path / "store")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(model_path).tensors}
    for layer in store.manifest.layers:
        expert_format = layer.format
        assert expert_format.activation == "swiglu_oai" and expert_format.has_biases
        assert expert_format.to_dict()["has_biases"] is True
        for expert in (0, 5):
            payload = store.read_payload(store.manifest.expert_id(layer.moe_layer, expert))
            for matrix in expert_format.matrices:
                raw = np.asarray(tensors[f"blk.{layer.block}.ffn_{matrix.name}_exps.weight"].data)[expert]
                assert np.array_equal(payload.matrix_bytes(matrix), raw.reshape(-1).view(np.uint8))
            for name, bias in zip(("gate", "up", "down"), payload.biases()):
                expected = np.asarray(tensors[f"blk.{layer.block}.ffn_{name}_exps.bias"].data)[expert]
                assert np.array_equal(bias, expected)


def test_the_store_computes_what_the_gguf_computes(model_path, tmp_path):
    convert_gguf(model_path, tmp_path / "store")
    model = MoEModel.load(model_path)
    tokens = [5, 17, 260, 3, 99, 120, 7, 8, 9, 10, 11]
    ours = forward(model, tokens, model.new_kv_cache(len(tokens)), StoreExperts(ExpertStore.open(tmp_path / "store")))
    reference = forward(model, tokens, model.new_kv_cache(len(tokens)), GGUFExperts(model.source))
    assert np.array_equal(ours.logits, reference.logits)


def test_slices_sum_to_the_whole_expert(model_path):
    model = MoEModel.load(model_path)
    payload = GGUFExperts(model.source).payload(0, 3)
    slices = plan_slices(payload.format, max_slices=4)
    x = np.random.default_rng(2).standard_normal((3, model.hparams.d_model)).astype(np.float32)
    whole = swiglu_expert(payload, x, ggml_rounding=True)
    halves = [swiglu_expert(payload, x, slice(start, start + 128), ggml_rounding=True) for start in (0, 128)]
    np.testing.assert_allclose(halves[0] + halves[1], whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    without_bias = swiglu_expert(payload, x, slice(128, 256), ggml_rounding=True)
    assert np.array_equal(without_bias, halves[1])  # only the slice starting at 0 carries the down bias
    partials = item_partials(payload, x, slices)
    np.testing.assert_allclose(expert_outputs(pack_batches({3: x}), partials)[3], whole, rtol=0,
                               atol=1e-5 * np.abs(whole).max())
