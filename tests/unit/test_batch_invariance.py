"""Batch-invariant compute: each row's result has the same bits whatever the batch it is computed in.

Serving batches the tokens of many sequences into one step (`docs/serving.md`): a sequence's greedy
output equals `generate`'s alone only if every kernel computes each row with a fixed accumulation
order, independent of how many rows share the call and where the row sits. Checked on the real
kernels (every q4_0/q8_0/K-quant kernel this CPU has, native and planar; the dequantizing
kernels of f16/bf16/f32), on the expert FFN with d_ff slices and kernel threads, and on the embedded model's
dense steps (attention projections, router gate, LM head, RMS norm).
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.compute.dtypes import dtype_by_name
from mer.compute.expert_format import ExpertFormat, ExpertPayload, MatrixSpec
from mer.compute.swiglu import swiglu_expert
from mer.model.attention import rms_norm
from mer.model.model import MoEModel
from mer.models import tiny_model_path
from mer.quant.matmul import KERNELS, is_kernel_available, matmul
from mer.quant.planar import to_planar
from mer.quant.random_blocks import fill_random_matrix, random_expert_payload

SEED = 4242
ROWS, COLUMNS = 96, 256
BATCH = 19  # odd, more than any kernel's row tile
QUANTIZED_KERNELS = [kernel for kernel in KERNELS if kernel != "auto" and is_kernel_available(kernel)]


def _random_matrix(dtype: str, layout: str) -> tuple[MatrixSpec, np.ndarray]:
    info = dtype_by_name(dtype)
    spec = MatrixSpec("w", info.name, ROWS, COLUMNS, 0, info.matrix_nbytes(ROWS, COLUMNS), layout)
    data = np.empty(spec.nbytes, dtype=np.uint8)
    fill_random_matrix(data, info, ROWS, COLUMNS, key=SEED)
    if layout == "planar":
        data = to_planar(dtype, data, ROWS, COLUMNS)
    return spec, data


def _assert_rows_invariant(compute, x: np.ndarray) -> None:
    """`compute(x[a:b])` equals rows a..b of `compute(x)` bit for bit, for every prefix, suffix and single row."""
    full = compute(x)
    for count in range(1, x.shape[0] + 1):
        np.testing.assert_array_equal(compute(x[:count]), full[:count], err_msg=f"first {count} rows")
        np.testing.assert_array_equal(compute(x[count - 1 : count]), full[count - 1 : count], err_msg=f"row {count - 1} alone")
        np.testing.assert_array_equal(compute(x[count - 1 :]), full[count - 1 :], err_msg=f"rows from {count - 1}")


@pytest.mark.parametrize("kernel", QUANTIZED_KERNELS)
@pytest.mark.parametrize("layout", ["native", "planar"])
@pytest.mark.parametrize("dtype", ["q4_0", "q8_0", "q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("threads", [1, 2])
def test_quantized_matmul_rows_do_not_depend_on_the_batch(dtype, layout, kernel, threads):
    spec, data = _random_matrix(dtype, layout)
    x = np.random.default_rng(SEED).standard_normal((BATCH, COLUMNS)).astype(np.float32)
    _assert_rows_invariant(lambda rows: matmul(spec, data, rows, kernel=kernel, threads=threads), x)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_dequantizing_matmul_rows_do_not_depend_on_the_batch(dtype):
    spec, data = _random_matrix(dtype, "native")
    x = np.random.default_rng(SEED).standard_normal((BATCH, COLUMNS)).astype(np.float32)
    _assert_rows_invariant(lambda rows: matmul(spec, data, rows, threads=2), x)


@pytest.mark.parametrize("dtypes", [("q4_0", "q4_0", "q4_0"), ("q8_0", "q8_0", "q8_0"), ("q4_k", "q4_k", "q6_k"),
                                    ("f16", "f16", "f16")])
def test_expert_slices_do_not_depend_on_the_batch(dtypes):
    expert_format = ExpertFormat.build(COLUMNS, 512, dtypes)
    payload = ExpertPayload(expert_format, random_expert_payload(expert_format, SEED))
    x = np.random.default_rng(SEED).standard_normal((BATCH, COLUMNS)).astype(np.float32)
    for d_ff_slice in (slice(0, 256), slice(256, 512)):
        _assert_rows_invariant(
            lambda rows: swiglu_expert(payload, rows, d_ff_slice, threads=2, ggml_rounding=True), x)


def test_the_embedded_models_dense_steps_do_not_depend_on_the_batch():
    model = MoEModel.load(tiny_model_path())
    d_model = model.hparams.d_model
    x = np.random.default_rng(SEED).standard_normal((BATCH, d_model)).astype(np.float32)
    block = model.weights.blocks[0]
    for matrix in (block.attn_q, block.attn_k, block.attn_v, block.router, model.weights.output):
        _assert_rows_invariant(matrix, x)
    _assert_rows_invariant(lambda rows: rms_norm(rows, block.ffn_norm, model.hparams.rms_norm_eps), x)
    attended = np.random.default_rng(SEED + 1).standard_normal((BATCH, block.attn_output.columns)).astype(np.float32)
    _assert_rows_invariant(block.attn_output, attended)
