"""glm4moe's pieces without llama.cpp: partial NEOX RoPE, the keys it reads, the NextN blocks it skips."""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import GGUFError
from mer.model.attention import apply_rope, rope_tables
from mer.model.hparams import ROPE_NEOX
from mer.model.model import MoEModel
from mer.store.gguf_source import read_gguf_source
from tests.support.glm4moe_models import write_tiny_glm4moe_gguf


def test_partial_neox_rope_rotates_the_first_values_of_each_head_and_keeps_the_rest():
    """ggml's rope with n_dims 16 of a 32-value head: pairs (i, i + 8) for i < 8, values 16.. unchanged."""
    x = np.random.default_rng(0).standard_normal((3, 2, 32)).astype(np.float32)
    cos, sin = rope_tables(np.arange(3), 16, 10000.0, 1.0)
    out = apply_rope(x, cos, sin, ROPE_NEOX)
    np.testing.assert_array_equal(out[..., 16:], x[..., 16:])
    angles = np.arange(3)[:, None] * 10000.0 ** (-np.arange(8) / 8)
    first, second = x[..., :8], x[..., 8:16]
    expected = np.concatenate([first * np.cos(angles)[:, None] - second * np.sin(angles)[:, None],
                               first * np.sin(angles)[:, None] + second * np.cos(angles)[:, None]], axis=-1)
    np.testing.assert_allclose(out[..., :16], expected, rtol=1e-5, atol=1e-6)


def test_the_keys_glm4moe_reads(tmp_path):
    """Absent `expert_gating_func`: sigmoid (llama.cpp's default for glm4moe); `nextn_predict_layers` makes the
    last block a skipped one; the shared expert is expert_shared_count x expert_feed_forward_length wide."""
    model = MoEModel.load(write_tiny_glm4moe_gguf(tmp_path / "m.gguf", expert_dtype="f32", gating_key=False).path)
    hparams = model.hparams
    assert (hparams.num_blocks, hparams.nextn_blocks, hparams.leading_dense_blocks) == (3, 1, 1)
    assert (hparams.routing_function.score, hparams.routing_function.normalize) == ("sigmoid", True)
    assert (hparams.expert_d_ff, hparams.shared_expert_d_ff, hparams.rope_dimensions) == (64, 64, 16)
    assert all(model.weights.blocks[block].selection_bias is not None for block in (1, 2))


def test_a_nextn_count_that_leaves_no_block_is_refused_by_name(tmp_path):
    info = write_tiny_glm4moe_gguf(tmp_path / "m.gguf", expert_dtype="f32", n_layers=1, n_nextn=0,
                                   extra_keys={"nextn_predict_layers": 1})
    with pytest.raises(GGUFError, match="glm4moe.nextn_predict_layers is 1"):
        read_gguf_source(info.path)
