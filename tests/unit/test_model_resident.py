"""Resident dense weights (`mer.model.resident`): copies of the file's bytes, not views of its mapping,
giving bit-identical logits; the router's generation loads them that way."""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import GGUFError
from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.model import MoEModel
from mer.model.resident import read_resident
from tests.support.gguf_models import write_tiny_moe_gguf

SEQUENCE = [3, 77, 301, 150, 9, 250, 42, 17]


def matrices(model: MoEModel) -> list:
    weights = model.weights
    found = [weights.token_embedding, weights.output]
    for block in weights.blocks:
        found += [block.attn_q, block.attn_k, block.attn_v, block.attn_output]
        found += [block.router] if block.router is not None else list(block.dense_ffn)
    return found


@pytest.mark.parametrize("dtype", ["f32", "q4_0", "q8_0"])
def test_resident_weights_are_copies_with_identical_bytes_and_logits(tmp_path, dtype):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", dtypes=(dtype,) * 3, dense_dtype=dtype, dense_first_layer=True,
                               vocab_size=384, n_layers=3, seed=5)
    mapped, resident = MoEModel.load(info.path), MoEModel.load(info.path, resident=True)
    file_bytes = mapped.source.parts[0].reader.data
    for in_file, copy in zip(matrices(mapped), matrices(resident), strict=True):
        assert in_file.tensor.name == copy.tensor.name and in_file.tensor.offset == copy.tensor.offset > 0
        assert np.shares_memory(in_file.tensor.data, file_bytes)
        assert not np.shares_memory(copy.tensor.data, file_bytes) and copy.tensor.data.flags.owndata
        assert np.array_equal(in_file.tensor.data, copy.tensor.data)
        assert np.array_equal(file_bytes[copy.tensor.offset : copy.tensor.offset + copy.tensor.nbytes],
                              copy.tensor.data)
    expected = forward(mapped, SEQUENCE, mapped.new_kv_cache(16), GGUFExperts(mapped.source)).logits
    logits = forward(resident, SEQUENCE, resident.new_kv_cache(16), GGUFExperts(resident.source)).logits
    assert np.array_equal(expected, logits)


def test_a_file_cut_short_while_it_is_read_is_an_error_naming_file_and_tensor(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", seed=1)
    model = MoEModel.load(info.path)
    last = max((tensor for tensor in model.source.parts[0].tensors), key=lambda tensor: tensor.offset)
    with open(info.path, "r+b") as file:  # the mapping stays; the file loses its last tensor's tail
        file.truncate(last.offset + last.nbytes // 2)
    with pytest.raises(GGUFError, match=rf"m\.gguf: tensor {last.name} is cut short"):
        read_resident([last])
