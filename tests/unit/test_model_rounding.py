"""ggml's rounding of matmul inputs for float weights (f16, bf16), and the expert computed with it.

The f16 rounding is numpy's float16 conversion (round to nearest even); bf16 is checked against
the nearest bfloat16 found by bit arithmetic here (ties to even). An f16 expert computed with
`ggml_rounding=True` matches a float64 reference whose x and h are rounded to f16 to 1e-6 (float32
sums only), while the unrounded reference differs by ~1e-4 (the f16 rounding itself).
"""

from __future__ import annotations

import numpy as np
from gguf.quants import dequantize as gguf_dequantize

from mer.compute.dtypes import dtype_by_name
from mer.compute.expert_format import ExpertFormat, ExpertPayload
from mer.quant.activation_k import K4_ORDER
from mer.quant.matmul import prepare_activation, round_float_activation
from tests.support.quant_helpers import random_matrix, reference_q8_k
from mer.compute.swiglu import swiglu_expert

RNG = np.random.default_rng(8)


def nearest_bfloat16(value: np.float32) -> np.float32:
    bits = int(np.array([value], dtype=np.float32).view(np.uint32)[0])
    low, high = bits & 0xFFFF0000, (bits & 0xFFFF0000) + 0x10000
    as_float = lambda pattern: float(np.array([pattern], dtype=np.uint32).view(np.float32)[0])  # noqa: E731
    below, above = abs(float(value) - as_float(low)), abs(as_float(high) - float(value))
    chosen = low if below < above or (below == above and not (low >> 16) & 1) else high
    return np.float32(as_float(chosen))


def test_f16_and_bf16_rounding():
    x = (RNG.standard_normal(400) * 10.0 ** RNG.integers(-3, 4, 400)).astype(np.float32)
    assert np.array_equal(round_float_activation("f16", x), x.astype(np.float16).astype(np.float32))
    assert np.array_equal(round_float_activation("bf16", x), np.array([nearest_bfloat16(v) for v in x]))
    ties = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], dtype=np.float32)  # exactly halfway between bf16 values
    assert np.array_equal(round_float_activation("bf16", ties), np.array([1.0, 1.0 + 2.0**-6], dtype=np.float32))
    assert np.isnan(round_float_activation("bf16", np.array([np.nan], dtype=np.float32))[0])
    for dtype in ("f32", "q4_0", "q8_0"):
        assert np.array_equal(round_float_activation(dtype, x), x)


def test_k_quant_inputs_are_rounded_to_q8_k_once_as_ggml_rounds_them():
    """The K-quant kernels take their input as Q8_K (`prepare_activation`); `round_float_activation`
    leaves it alone, so the model's float path cannot round it twice."""
    rng = np.random.default_rng(14)  # its own stream: the module's RNG feeds the tests below
    x = (rng.standard_normal((3, 512)) * 10.0 ** rng.integers(-3, 4, (3, 512))).astype(np.float32)
    x[1, :256] = 0  # a block of zeros stays zero
    x[2, 300] = -np.abs(x[2, 256:512]).max() * 2  # a negative largest value: iscale positive
    x[2, 400] = -x[2, 300]  # a later value of the same magnitude does not replace it
    expected = reference_q8_k(x)
    for dtype in ("q4_k", "q5_k", "q6_k"):
        assert np.array_equal(round_float_activation(dtype, x), x)
        activation = prepare_activation(dtype, x)
        quants = activation.quants.astype(np.float64)  # [num_blocks, batch, 256] in the kernel's order
        if dtype != "q6_k":
            quants = quants[:, :, np.argsort(K4_ORDER)]
        rounded = (quants * activation.scales[:, :, :1].astype(np.float64)).transpose(1, 0, 2).reshape(x.shape)
        assert np.array_equal(rounded, expected)
    assert not rounded[1, :256].any() and (np.abs(rounded - x) <= np.abs(x).max(axis=1, keepdims=True) / 254 * 1.0001).all()


def test_f16_expert_with_ggml_rounding_matches_a_rounded_reference():
    d_model, d_ff = 64, 96
    expert_format = ExpertFormat.build(d_model, d_ff, ("f16", "f16", "f16"))
    payload = np.empty(expert_format.payload_nbytes, dtype=np.uint8)
    matrices = []
    for index, matrix in enumerate(expert_format.matrices):
        native = random_matrix("f16", matrix.rows, matrix.columns, (8, index))
        matrices.append(gguf_dequantize(native, dtype_by_name("f16").ggml_type).astype(np.float64))
        payload[matrix.offset : matrix.offset + matrix.nbytes] = native.reshape(-1)
    x = RNG.standard_normal((3, d_model)).astype(np.float32)

    def reference(rounded: bool) -> np.ndarray:
        cast = (lambda values: values.astype(np.float16).astype(np.float64)) if rounded else (lambda values: values)
        gate, up = cast(x) @ matrices[0].T, cast(x) @ matrices[1].T
        h = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
        return cast(h) @ matrices[2].T

    out = swiglu_expert(ExpertPayload(expert_format, payload), x, ggml_rounding=True)
    relative = lambda expected: np.linalg.norm(out - expected) / np.linalg.norm(expected)  # noqa: E731
    assert relative(reference(rounded=True)) < 1e-6
    assert relative(reference(rounded=False)) > 1e-5
    assert not np.array_equal(out, swiglu_expert(ExpertPayload(expert_format, payload), x))
