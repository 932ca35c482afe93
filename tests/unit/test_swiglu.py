"""swiglu_expert against a float64 reference built from gguf-py's dequantization.

The reference follows the same recipe as the kernels: for q4_0/q8_0 matrices the input (x for
gate/up, h for down) is rounded to q8_0 per 32-block with llama.cpp's rule (`reference_q8_0`),
for K-quant matrices to Q8_K per 256-block (`reference_q8_k`).
Tolerances (relative 2-norm error of the output):

- float-activation dtypes (f16, bf16, f32): 1e-5, float32 arithmetic only (measured ~1.5e-7).
- q4_0/q8_0/K-quant down: 2e-3. h is computed in float32 by the kernel and in float64 by the
  reference, so an element of h lying within float32 rounding of a q8_0 / Q8_K rounding boundary
  may round one step apart, moving the output by up to ~1e-3 of its norm at these sizes; the
  tolerance allows one or two such elements. Measured with these seeds: ~1e-7 (none occurred).
- against the all-float64 expert without any activation rounding, q4_0/q8_0/K-quant experts are
  within 3e-2 (measured 7e-3 to 1.2e-2, the ~1e-2 of ggml's own q8_0 / Q8_K activations).
Consecutive d_ff slices summed equal the full output to 1e-5 of its largest value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from mer.compute.dtypes import dtype_by_name
from mer.errors import ShapeError
from mer.compute.expert_format import ExpertFormat, ExpertPayload
from mer.quant.planar import to_planar
from tests.support.quant_helpers import random_matrix, reference_q8_k
from mer.compute.swiglu import swiglu_expert
from test_matmul import reference_q8_0

SEED = 777
D_MODEL, D_FF = 256, 512
FUSED = ("q4_0", "q8_0")
K_QUANTS = ("q4_k", "q5_k", "q6_k")
ROUNDED = FUSED + K_QUANTS


def make_expert(dtypes: tuple[str, str, str], layout: str) -> tuple[ExpertPayload, list[np.ndarray]]:
    """A random expert payload and its three float64 reference matrices."""
    expert_format = ExpertFormat.build(D_MODEL, D_FF, dtypes, layout)
    payload = np.empty(expert_format.payload_nbytes, dtype=np.uint8)
    references = []
    for index, matrix in enumerate(expert_format.matrices):
        native = random_matrix(matrix.dtype, matrix.rows, matrix.columns, (SEED, index))
        references.append(gguf_dequantize(native, dtype_by_name(matrix.dtype).ggml_type).astype(np.float64))
        stored = native.reshape(-1)
        if layout == "planar":
            stored = to_planar(matrix.dtype, stored, matrix.rows, matrix.columns)
        payload[matrix.offset : matrix.offset + matrix.nbytes] = stored
    return ExpertPayload(expert_format, payload), references


def reference_expert(
    dtypes: tuple[str, str, str],
    references: list[np.ndarray],
    x: np.ndarray,
    hidden: slice = slice(None),
    round_activations: bool = True,
) -> np.ndarray:
    """The float64 expert; inputs of q4_0/q8_0 matrices rounded to q8_0, of K-quants to Q8_K,
    unless told not to."""
    gate, up, down = references

    def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
        if round_activations and dtype in K_QUANTS:
            return reference_q8_k(values)
        return reference_q8_0(values) if round_activations and dtype in FUSED else values

    gate_out = rounded(x, dtypes[0]) @ gate[hidden].T
    up_out = rounded(x, dtypes[1]) @ up[hidden].T
    h = gate_out / (1 + np.exp(-gate_out)) * up_out
    return rounded(h, dtypes[2]) @ down[:, hidden].T


def relative_error(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def tokens(batch: int) -> np.ndarray:
    return np.random.default_rng(SEED + batch).standard_normal((batch, D_MODEL)).astype(np.float32)


ALL_DTYPES = ("q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "bf16", "f32")
CASES = [((dtype,) * 3, "native") for dtype in ALL_DTYPES] + [
    (("q4_0",) * 3, "planar"),
    (("q8_0",) * 3, "planar"),
    (("q4_0", "q4_0", "q6_k"), "planar"),
    (("q4_k", "q4_k", "q8_0"), "native"),
    (("q4_k", "q4_k", "q6_k"), "native"),
    (("q5_k", "q5_k", "q6_k"), "planar"),
    (("q8_0", "q4_0", "f16"), "native"),
]


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("dtypes, layout", CASES)
def test_expert_matches_the_reference(dtypes: tuple[str, str, str], layout: str, batch: int) -> None:
    payload, references = make_expert(dtypes, layout)
    x = tokens(batch)
    out = swiglu_expert(payload, x)
    assert out.dtype == np.float32 and out.shape == (batch, D_MODEL)
    expected = reference_expert(dtypes, references, x.astype(np.float64))
    assert relative_error(out, expected) < (2e-3 if dtypes[2] in ROUNDED else 1e-5)
    if any(dtype in ROUNDED for dtype in dtypes):
        unrounded = reference_expert(dtypes, references, x.astype(np.float64), round_activations=False)
        assert relative_error(out, unrounded) < 3e-2


@pytest.mark.parametrize(
    "dtypes, layout, bounds",
    [
        (("q4_0",) * 3, "planar", [0, 96, 128, 416, 512]),
        (("q8_0",) * 3, "native", [0, 32, 512]),
        (("q4_0", "q4_0", "q6_k"), "planar", [0, 256, 512]),
        (("q4_k", "q4_k", "q6_k"), "native", [0, 256, 512]),
        (("f32",) * 3, "native", [0, 64, 512]),
    ],
)
def test_slices_sum_to_the_full_output(dtypes: tuple[str, str, str], layout: str, bounds: list[int]) -> None:
    payload, references = make_expert(dtypes, layout)
    x = tokens(3)
    full = swiglu_expert(payload, x)
    total = np.zeros_like(full)
    for start, stop in zip(bounds, bounds[1:]):
        partial = swiglu_expert(payload, x, slice(start, stop))
        expected = reference_expert(dtypes, references, x.astype(np.float64), slice(start, stop))
        assert relative_error(partial, expected) < (2e-3 if dtypes[2] in ROUNDED else 1e-5)
        total += partial
    assert np.max(np.abs(total - full)) <= 1e-5 * np.max(np.abs(full))


def test_one_token_and_threads() -> None:
    payload, _ = make_expert(("q4_0",) * 3, "planar")
    x = tokens(1)
    single = swiglu_expert(payload, x[0])
    assert single.shape == (D_MODEL,)
    assert np.array_equal(single, swiglu_expert(payload, x)[0])
    assert np.array_equal(swiglu_expert(payload, x, threads=2), swiglu_expert(payload, x, threads=1))


def test_bad_slices_and_inputs_are_refused() -> None:
    payload, _ = make_expert(("q4_0", "q4_0", "q6_k"), "native")  # slice quantum 256
    x = tokens(1)
    for bad in (slice(0, 32), slice(256, 256), slice(0, 768), slice(0, 512, 2)):
        with pytest.raises(ShapeError, match="slice quantum 256"):
            swiglu_expert(payload, x, bad)
    with pytest.raises(ShapeError, match=r"\(batch, 256\)"):
        swiglu_expert(payload, np.zeros((2, 128), dtype=np.float32))
    with pytest.raises(ShapeError, match="float32"):
        swiglu_expert(payload, np.zeros((1, 2, 256), dtype=np.float32))


@pytest.mark.llama
@pytest.mark.parametrize("dtypes", [(dtype,) * 3 for dtype in ROUNDED] + [("q4_k", "q4_k", "q6_k"), ("q5_k", "q4_k", "q8_0")])
def test_matches_ggml_on_the_same_bytes(dtypes: tuple[str, str, str]) -> None:
    """ggml's own kernels (llama-cpp-python's libggml) on the same native bytes: same q8_0 / Q8_K
    rounding of x and h, so the outputs agree to float32 rounding (measured ~1e-7 relative);
    the 2e-3 bound leaves room for an h element rounding one step apart (ggml's silu uses its
    own exp). Mixed dtypes per matrix as in Q4_K_M files."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from ggml_reference import GgmlExpert

    payload, _ = make_expert(dtypes, "native")
    x = tokens(3)
    ggml_expert = GgmlExpert(payload.data, D_MODEL, D_FF, dtypes, batch=3)
    try:
        expected = ggml_expert.compute(x, threads=1)
    finally:
        ggml_expert.close()
    assert relative_error(swiglu_expert(payload, x), expected) < 2e-3


@pytest.mark.parametrize("dtypes", [("q4_0",) * 3, ("q8_0", "q8_0", "q6_k")])
def test_a_token_gets_the_same_bits_alone_or_in_a_batch(dtypes: tuple[str, str, str]) -> None:
    """Every token has its own accumulators and its own q8_0 blocks, so batching changes nothing."""
    payload, _ = make_expert(dtypes, "planar")
    x = tokens(11)
    batched = swiglu_expert(payload, x)
    for index in range(len(x)):
        assert np.array_equal(swiglu_expert(payload, x[index]), batched[index])
