"""The forward pass against the float64 numpy reference (tests/support/reference_forward.py).

Tolerance: for f32 models mer's logits match the float64 reference to 1e-4 of the largest logit
at every position (float32 arithmetic over 2 blocks; measured ~3e-7). Prefill in one batch and
token-by-token decoding with the KV cache agree to 1e-5 (the same float32 operations, summed in
another order in the attention only). The routing of these random models is checked to be
spread over the experts (not collapsed), so that the comparisons exercise every expert. The same
pass with async experts and an observer (as the router runs it) gives the same logits and tells the
observer each MoE block's routing, residual and costs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mer.errors import ContextLengthError, TokenizerError, UnsupportedModelError
from mer.model.experts import GGUFExperts, StoreExperts
from mer.model.forward import ForwardPass, forward, run_inline
from mer.model.model import MoEModel
from mer.store.convert import convert_gguf
from mer.store.reader import ExpertStore
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.reference_forward import ReferenceModel

ARCHITECTURES = ["llama", "qwen3moe", "olmoe"]
SEQUENCE = [3, 77, 301, 150, 9, 250, 42, 42, 17, 266, 100, 5, 380, 64, 128, 7, 99, 300, 12, 45, 200, 11, 33, 70]


def tiny_model(tmp_path, arch: str, dtype: str = "f32", **options):  # type: ignore[no-untyped-def]
    settings = dict(arch=arch, dtypes=(dtype,) * 3, dense_dtype=dtype, n_experts=8, top_k=2, d_model=64, d_ff=128,
                    n_heads=4, n_kv_heads=4 if arch == "olmoe" else 2, vocab_size=384, seed=11)
    return write_tiny_moe_gguf(tmp_path / f"{arch}-{dtype}.gguf", **{**settings, **options})


def relative_error(logits: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Per position: the largest logit difference over the largest reference logit."""
    return np.abs(logits - expected).max(axis=-1) / np.abs(expected).max(axis=-1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f32_logits_match_the_float64_reference(tmp_path, arch):
    info = tiny_model(tmp_path, arch)
    model = MoEModel.load(info.path)
    result = forward(model, SEQUENCE, model.new_kv_cache(64), GGUFExperts(model.source))
    expected = ReferenceModel(info.path).logits(SEQUENCE)
    errors = relative_error(result.logits, expected)
    print(f"{arch}: max relative logit error vs float64 {errors.max():.2e}")
    assert result.logits.dtype == np.float32 and result.logits.shape == (len(SEQUENCE), 384)
    assert errors.max() < 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_routing_is_spread_over_experts_in_every_block(tmp_path, arch):
    info = tiny_model(tmp_path, arch)
    model = MoEModel.load(info.path)
    result = forward(model, SEQUENCE, model.new_kv_cache(64), GGUFExperts(model.source))
    for block, routing in result.routings.items():
        counts = np.bincount(routing.experts.ravel(), minlength=8)
        assert (counts > 0).sum() >= 6 and counts.max() <= 0.45 * counts.sum(), (block, counts.tolist())
        assert np.all(routing.experts[:, 0] != routing.experts[:, 1])
    first, second = (result.routings[block].experts for block in sorted(result.routings))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoding_token_by_token_matches_prefill(tmp_path, arch):
    info = tiny_model(tmp_path, arch, dtype="q4_0")
    model = MoEModel.load(info.path)
    experts = GGUFExperts(model.source)
    prefill = forward(model, SEQUENCE, model.new_kv_cache(32), experts).logits
    cache = model.new_kv_cache(32)
    stepwise = np.concatenate([forward(model, [token], cache, experts).logits for token in SEQUENCE])
    assert cache.length == len(SEQUENCE)
    assert relative_error(stepwise, prefill).max() < 1e-5


def test_prefill_is_expert_major_one_call_per_block(tmp_path):
    info = tiny_model(tmp_path, "qwen3moe")
    model = MoEModel.load(info.path)
    experts = GGUFExperts(model.source)
    result = forward(model, SEQUENCE, model.new_kv_cache(64), experts)
    assert [layer for layer, _ in experts.calls] == [0, 1]
    for (layer, called), block in zip(experts.calls, sorted(result.routings)):
        assert called == tuple(sorted(set(result.routings[block].experts.ravel().tolist())))


def test_all_logits_off_returns_the_last_position(tmp_path):
    info = tiny_model(tmp_path, "llama")
    model = MoEModel.load(info.path)
    experts = GGUFExperts(model.source)
    full = forward(model, SEQUENCE, model.new_kv_cache(64), experts).logits
    last = forward(model, SEQUENCE, model.new_kv_cache(64), experts, all_logits=False).logits
    assert last.shape == (1, 384) and np.array_equal(last[0], full[-1])


def test_experts_from_a_converted_store_give_identical_logits(tmp_path):
    info = tiny_model(tmp_path, "olmoe", dtype="q8_0")
    model = MoEModel.load(info.path)
    store = ExpertStore.open(convert_gguf(info.path, tmp_path / "store", layout="planar").out)
    from_gguf = forward(model, SEQUENCE, model.new_kv_cache(64), GGUFExperts(model.source)).logits
    from_store = forward(model, SEQUENCE, model.new_kv_cache(64), StoreExperts(store)).logits
    assert np.array_equal(from_gguf, from_store)


def test_a_dense_first_block_runs_its_own_ffn(tmp_path):
    info = tiny_model(tmp_path, "llama", n_layers=3, dense_first_layer=True)
    model = MoEModel.load(info.path)
    result = forward(model, SEQUENCE[:6], model.new_kv_cache(8), GGUFExperts(model.source))
    assert sorted(result.routings) == [1, 2] and model.moe_layers == {1: 0, 2: 1}
    assert np.all(np.isfinite(result.logits))


def test_bad_tokens_positions_and_context_are_refused(tmp_path):
    info = tiny_model(tmp_path, "llama", context_length=16)
    model = MoEModel.load(info.path)
    experts = GGUFExperts(model.source)
    with pytest.raises(TokenizerError, match="token id 384 is outside the vocabulary of 384 tokens"):
        forward(model, [1, 384], model.new_kv_cache(8), experts)
    with pytest.raises(ContextLengthError, match="KV cache of 17 positions: the model's context length is 16"):
        model.new_kv_cache(17)
    cache = model.new_kv_cache(4)
    with pytest.raises(ContextLengthError, match="position 4 does not fit in the KV cache of 4 positions"):
        forward(model, [1, 2, 3, 4, 5], cache, experts)
    hidden = model.embed([1, 2])
    with pytest.raises(ContextLengthError, match="must continue the KV cache at position 0"):
        model.attention_block(0, hidden, model.new_kv_cache(4), np.array([1, 2]))


def test_unsupported_tensors_are_refused(tmp_path):
    info = tiny_model(tmp_path, "olmoe", n_layers=2)
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(info.path)
    writer = GGUFWriter(tmp_path / "bias.gguf", "olmoe")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tuple(reversed([int(n) for n in tensor.shape])),
                          raw_dtype=tensor.tensor_type)
    writer.add_tensor("blk.0.attn_output.bias", np.zeros(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="tensor blk.0.attn_output.bias is not supported"):
        MoEModel.load(tmp_path / "bias.gguf")


class RecordingObserver:
    """What a pass tells its observer: each MoE block's routing and residual, then its costs."""

    def __init__(self):
        self.routed_blocks: list[tuple[int, list[int], np.ndarray, np.ndarray]] = []
        self.done: list = []

    async def routed(self, moe_layer, positions, residual, routing):
        self.routed_blocks.append((moe_layer, positions.tolist(), residual.copy(), routing.experts.copy()))

    async def block_done(self, costs):
        self.done.append(costs)


def test_the_pass_with_async_experts_and_an_observer_computes_the_same_numbers(tmp_path):
    info = tiny_model(tmp_path, "llama", n_layers=3, dense_first_layer=True)
    model = MoEModel.load(info.path)
    experts = GGUFExperts(model.source)
    reference = forward(model, SEQUENCE[:6], model.new_kv_cache(8), experts)
    calls: list[tuple[int, int]] = []

    async def graph_like_experts(moe_layer, batches, token):
        calls.append((moe_layer, token))
        return experts(moe_layer, batches)

    observer = RecordingObserver()
    cache = model.new_kv_cache(8)
    result = asyncio.run(ForwardPass(model, graph_like_experts, observer=observer)(SEQUENCE[:6], cache))
    assert np.array_equal(result.logits, reference.logits)
    assert calls == [(0, 5), (1, 5)]  # one call per MoE layer, with the pass's last position
    assert [(layer, positions) for layer, positions, _, _ in observer.routed_blocks] == [(0, list(range(6))),
                                                                                        (1, list(range(6)))]
    for (_, _, residual, routed), block in zip(observer.routed_blocks, (1, 2)):
        assert np.array_equal(routed, reference.routings[block].experts) and residual.shape == (6, 64)
    assert [(done.block, done.moe_layer, done.num_experts) for done in observer.done] == [
        (block, block - 1, len(np.unique(reference.routings[block].experts))) for block in (1, 2)]
    assert result.costs.moe_blocks == 2 and result.costs.expert_us > 0 and result.costs.other_us > 0


def test_an_in_process_pass_that_waits_is_refused(tmp_path):
    info = tiny_model(tmp_path, "llama")
    model = MoEModel.load(info.path)

    async def waiting_experts(moe_layer, batches, token):
        await asyncio.sleep(0)
        return {}

    with pytest.raises(RuntimeError, match="waited on something"):
        run_inline(ForwardPass(model, waiting_experts)(SEQUENCE[:2], model.new_kv_cache(4)))
