"""Expert-major batches as the graph computes them: layout, per-expert slice partials, their sum."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from mer.errors import ShapeError
from mer.compute.batches import (PROGRESS_CHUNK_ROWS, expert_outputs, item_partials, item_partials_in_chunks,
                                 pack_batches, sum_slices, weighted_sum)
from mer.compute.expert_format import ExpertFormat, ExpertPayload
from mer.compute.slicing import plan_slices
from mer.compute.swiglu import swiglu_expert
from mer.quant.random_blocks import random_expert_payload

D_MODEL, D_FF = 64, 768  # d_ff of 2 slices (expert_slices 2, MIN_SLICE_ROWS = 256), so slices are really summed


def random_payload(dtype: str, seed: int) -> tuple[ExpertPayload, list[np.ndarray]]:
    """A payload of random gate/up/down in `dtype` and the float64 matrices it holds."""
    rng = np.random.default_rng(seed)
    expert_format = ExpertFormat.build(D_MODEL, D_FF, (dtype,) * 3)
    qtype = GGMLQuantizationType[dtype.upper()]
    parts, matrices = [], []
    for rows, columns in ((D_FF, D_MODEL), (D_FF, D_MODEL), (D_MODEL, D_FF)):
        quantized = quantize((rng.standard_normal((rows, columns)) / np.sqrt(columns)).astype(np.float32), qtype)
        parts.append(np.frombuffer(quantized.tobytes(), np.uint8))
        matrices.append(dequantize(quantized, qtype).astype(np.float64).reshape(rows, columns))
    return ExpertPayload(expert_format, np.concatenate(parts)), matrices


def numpy_swiglu(matrices: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    gate, up, down = matrices
    g, u = x.astype(np.float64) @ gate.T, x.astype(np.float64) @ up.T
    return (g / (1 + np.exp(-g)) * u) @ down.T


def test_packed_batches_lay_experts_end_to_end():
    rng = np.random.default_rng(0)
    batches = {5: rng.standard_normal((3, D_MODEL)).astype(np.float32),
               1: rng.standard_normal((1, D_MODEL)).astype(np.float32)}
    packed = pack_batches(batches, [1, 5])
    assert packed.experts == (1, 5) and packed.row_offsets == (0, 1, 4)
    assert np.array_equal(packed.x[packed.rows_of(1)], batches[5]) and np.array_equal(packed.x[0:1], batches[1])
    with pytest.raises(ShapeError):
        pack_batches({1: np.zeros((0, D_MODEL), np.float32)})
    with pytest.raises(ShapeError):
        expert_outputs(packed, np.zeros((2, 3, D_MODEL), np.float32))


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_each_expert_gets_its_own_rows_and_the_slices_sum_to_its_output(dtype):
    rng = np.random.default_rng(1)
    payloads = {expert: random_payload(dtype, seed=expert) for expert in (2, 6)}
    batches = {2: rng.standard_normal((4, D_MODEL)).astype(np.float32),
               6: rng.standard_normal((2, D_MODEL)).astype(np.float32)}
    packed = pack_batches(batches)
    slices = plan_slices(payloads[2][0].format)
    assert len(slices) > 1
    partials = np.empty((len(slices), *packed.x.shape), np.float32)
    for index, expert in enumerate(packed.experts):  # as a worker fills its job's rows
        partials[:, packed.rows_of(index)] = item_partials(payloads[expert][0], batches[expert], slices)
    outputs = expert_outputs(packed, partials)
    for expert, x in batches.items():
        full = swiglu_expert(payloads[expert][0], x, ggml_rounding=True)
        np.testing.assert_allclose(outputs[expert], full, rtol=0, atol=1e-5 * np.abs(full).max())
        reference = numpy_swiglu(payloads[expert][1], x)
        tolerance = 1e-5 if dtype == "f32" else 3e-2  # q8_0: the kernels round x and h to q8_0, as llama.cpp
        assert np.abs(outputs[expert] - reference).max() <= tolerance * np.abs(reference).max()


def test_slices_and_weighted_experts_are_summed_in_a_fixed_order_in_float32():
    rng = np.random.default_rng(2)
    partials = (rng.standard_normal((5, 3, D_MODEL)) * 10.0 ** rng.integers(-4, 5, (5, 1, 1))).astype(np.float32)
    expected = partials[0].copy()
    for index in range(1, 5):  # slice order: a different order may round differently
        expected += partials[index]
    assert sum_slices(partials).dtype == np.float32 and np.array_equal(sum_slices(partials), expected)
    outputs, weights = [partials[0], partials[3], partials[1]], [0.5, 0.25, 0.125]
    expected = np.zeros_like(partials[0])
    for output, weight in zip(outputs, weights):
        expected += np.float32(weight) * output
    combined = weighted_sum(outputs, weights)
    assert combined.dtype == np.float32 and np.array_equal(combined, expected)
    with pytest.raises(ValueError):
        weighted_sum(outputs, weights[:2])


def test_the_slice_plan_follows_expert_slices_within_the_minimum_slice_size():
    mixtral = ExpertFormat.build(4096, 14336, ("q4_0",) * 3)
    assert plan_slices(mixtral) == plan_slices(mixtral, 2) == [(0, 7168), (7168, 14336)]  # the default: 2
    assert plan_slices(mixtral, 1) == [(0, 14336)]
    sixteen = plan_slices(mixtral, 16)
    assert len(sixteen) == 16 and all(stop - start == 896 for start, stop in sixteen)
    small = ExpertFormat.build(D_MODEL, D_FF, ("q8_0",) * 3)  # 768 rows: never below 256 rows a slice
    assert plan_slices(small, 64) == [(0, 256), (256, 512), (512, 768)]
    with pytest.raises(ValueError, match="expert_slices must be at least 1"):
        plan_slices(small, 0)


@pytest.mark.parametrize("dtypes", [("q4_0", "q4_0", "q4_0"), ("q4_k", "q4_k", "q6_k")])
@pytest.mark.parametrize("chunk_rows", [PROGRESS_CHUNK_ROWS, 7, 1])
def test_an_item_computed_in_chunks_of_rows_has_the_bits_of_one_call(dtypes, chunk_rows):
    """What a compute worker does between progress reports: an expert on a prefill-sized batch of rows,
    chunk by chunk (the last chunk shorter), byte for byte equal to one call on all its rows."""
    expert_format = ExpertFormat.build(256, 768, dtypes)
    payload = ExpertPayload(expert_format, random_expert_payload(expert_format, 77))
    slices = plan_slices(expert_format)
    assert len(slices) > 1
    x = np.random.default_rng(3).standard_normal((2 * PROGRESS_CHUNK_ROWS + 5, 256)).astype(np.float32)
    whole = item_partials(payload, x, slices, threads=2)
    chunked = np.full_like(whole, np.nan)
    chunks: list[int] = []
    item_partials_in_chunks(payload, x, slices, 2, chunked, chunks.append, chunk_rows=chunk_rows)
    assert sum(chunks) == x.shape[0] and max(chunks) == chunk_rows and len(chunks) == -(-x.shape[0] // chunk_rows)
    assert chunked.tobytes() == whole.tobytes()
    assert np.isfinite(whole).all() and np.abs(whole).max() > 0


def test_chunks_of_no_rows_are_refused():
    expert_format = ExpertFormat.build(256, 768, ("q4_0",) * 3)
    payload = ExpertPayload(expert_format, random_expert_payload(expert_format, 77))
    x = np.zeros((3, 256), np.float32)
    with pytest.raises(ShapeError, match="chunk_rows must be >= 1, got 0"):
        item_partials_in_chunks(payload, x, plan_slices(expert_format), 1, np.empty((2, 3, 256), np.float32),
                                lambda rows: None, chunk_rows=0)
