"""Random weight bytes: valid in every dtype, sane scales and magnitudes, deterministic in the seed.

Validity is checked against an independent reference, `gguf.quants.dequantize`; the byte stream
against a plain-Python splitmix64.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import Q4_K, dequantize

from mer.compute.dtypes import SUPPORTED_DTYPES, dtype_by_name
from mer.errors import ConfigError
from mer.compute.expert_format import ExpertFormat
from mer.quant.random_blocks import (default_std, fill_random_bytes, fill_random_matrix, random_expert_payload,
                                     seed_key)
from tests.support.quant_helpers import random_matrix, scale_ranges

ALL_DTYPES = sorted(SUPPORTED_DTYPES)
# byte offset of each f16 scale field inside a block, from the GGML block structs
SCALE_OFFSETS = {"q4_0": {"d": 0}, "q8_0": {"d": 0}, "q4_k": {"d": 0, "dmin": 2},
                 "q5_k": {"d": 0, "dmin": 2}, "q6_k": {"d": 208}}
ROWS, COLUMNS = 256, 1024


def splitmix64_reference(key: int, count: int) -> bytes:
    """Plain-Python splitmix64: state += golden; output = mix(state), little-endian words."""
    mask, state, out = (1 << 64) - 1, key, bytearray()
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        value = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
        out += (value ^ (value >> 31)).to_bytes(8, "little")
    return bytes(out)


def scale_field(matrix: np.ndarray, dtype_name: str, offset: int) -> np.ndarray:
    blocks = matrix.reshape(-1, dtype_by_name(dtype_name).type_size)
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float64).ravel()


@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_dequantizes_to_finite_values_with_the_requested_std(dtype_name):
    std = 0.02
    matrix = random_matrix(dtype_name, ROWS, COLUMNS, seed=11, std=std)
    assert matrix.shape == (ROWS, dtype_by_name(dtype_name).row_nbytes(COLUMNS))
    weights = dequantize(matrix, dtype_by_name(dtype_name).ggml_type)
    assert weights.shape == (ROWS, COLUMNS)
    assert np.isfinite(weights).all()
    assert weights.std() == pytest.approx(std, rel=0.10)
    assert abs(weights.mean()) < 0.06 * std


@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_default_std_is_one_over_sqrt_columns(dtype_name):
    weights = dequantize(random_matrix(dtype_name, ROWS, COLUMNS, seed=3), dtype_by_name(dtype_name).ggml_type)
    assert default_std(COLUMNS) == pytest.approx(1 / 32)
    assert weights.std() == pytest.approx(1 / 32, rel=0.10)


@pytest.mark.parametrize("dtype_name", sorted(SCALE_OFFSETS))
def test_every_scale_lies_in_its_published_range(dtype_name):
    std = default_std(COLUMNS)
    matrix = random_matrix(dtype_name, ROWS, COLUMNS, seed=5)
    ranges = scale_ranges(dtype_name, std)
    assert set(ranges) == set(SCALE_OFFSETS[dtype_name])
    for field, offset in SCALE_OFFSETS[dtype_name].items():
        values, scale_range = scale_field(matrix, dtype_name, offset), ranges[field]
        assert np.isfinite(values).all()
        assert scale_range.contains(values).all(), field
        assert 0 < scale_range.low < scale_range.high == pytest.approx(3 * scale_range.low, rel=0.02)
        magnitudes = np.abs(values)
        assert magnitudes.min() < scale_range.low * 1.1 and magnitudes.max() > scale_range.high * 0.9
        negative_share = (values < 0).mean()
        assert negative_share == (pytest.approx(0.5, abs=0.1) if scale_range.signed else 0.0)


@pytest.mark.parametrize("dtype_name", ["f16", "bf16", "f32"])
def test_float_values_are_normal_with_cut_tails(dtype_name):
    std = 0.05
    weights = dequantize(random_matrix(dtype_name, ROWS, COLUMNS, seed=2, std=std),
                         dtype_by_name(dtype_name).ggml_type).ravel()
    assert np.abs(weights).max() < 4.4 * std
    assert np.mean(np.abs(weights) < std) == pytest.approx(0.6827, abs=0.01)
    assert np.mean(np.abs(weights) < 2 * std) == pytest.approx(0.9545, abs=0.01)
    assert scale_ranges(dtype_name, std) == {}


def test_q4_0_nibbles_are_uniform():
    matrix = random_matrix("q4_0", ROWS, COLUMNS, seed=9)
    quants = matrix.reshape(-1, 18)[:, 2:]
    nibbles = np.concatenate([quants & 0x0F, quants >> 4]).ravel()
    shares = np.bincount(nibbles, minlength=16) / nibbles.size
    np.testing.assert_allclose(shares, 1 / 16, rtol=0.05)


@pytest.mark.parametrize("dtype_name", ["q4_k", "q5_k"])
def test_k_quant_six_bit_scales_and_mins_cover_their_range(dtype_name):
    matrix = random_matrix(dtype_name, ROWS, COLUMNS, seed=4)
    blocks = matrix.reshape(-1, dtype_by_name(dtype_name).type_size)
    scales, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    for values in (scales, mins):
        assert values.min() == 0 and values.max() == 63
        assert values.mean() == pytest.approx(31.5, abs=1.5)


def test_swiglu_output_has_a_reasonable_magnitude():
    expert_format = ExpertFormat.build(256, 512, ("q4_0", "q4_0", "q4_0"))
    payload = random_expert_payload(expert_format, seed=(1, 0, 0))
    gate, up, down = (
        dequantize(payload[m.offset : m.offset + m.nbytes].reshape(m.rows, -1), m.dtype_info.ggml_type)
        for m in expert_format.matrices
    )
    x = np.random.default_rng(0).standard_normal((256, 32))  # 32 tokens, RMS 1
    g, u = gate @ x, up @ x
    out = down @ (g / (1 + np.exp(-g)) * u)
    assert np.sqrt(np.mean(g**2)) == pytest.approx(1.0, rel=0.15)
    assert 0.3 < np.sqrt(np.mean(out**2)) < 1.0
    assert abs(out.mean()) < 0.1


def test_same_seed_same_bytes_and_different_seeds_differ():
    first = random_matrix("q4_k", 8, 512, seed=(7, 1, 2))
    np.testing.assert_array_equal(first, random_matrix("q4_k", 8, 512, seed=(7, 1, 2)))
    for other_seed in [(7, 2, 1), (8, 1, 2), (7, 1), 7]:
        other = random_matrix("q4_k", 8, 512, seed=other_seed)
        assert np.mean(first != other) > 0.9, other_seed


def test_expert_matrices_differ_from_each_other():
    expert_format = ExpertFormat.build(64, 64, ("q8_0",) * 3)
    payload = random_expert_payload(expert_format, seed=3)
    gate, up, down = (payload[m.offset : m.offset + m.nbytes] for m in expert_format.matrices)
    assert np.mean(gate != up) > 0.9 and np.mean(up != down) > 0.9


def test_byte_stream_is_splitmix64_whatever_the_alignment_and_length():
    key = seed_key((3, 4))
    expected = np.frombuffer(splitmix64_reference(key, 6), dtype=np.uint8)
    backing = np.zeros(64, dtype=np.uint8)
    for start in (0, 3, 8):
        for length in (45, 48, 1):
            view = backing[start : start + length]
            fill_random_bytes(view, key)
            np.testing.assert_array_equal(view, expected[:length], err_msg=f"start {start} length {length}")


def test_seed_key_rejects_negative_or_huge_seeds():
    for bad in (-1, 2**64, (1, -2), "7"):
        with pytest.raises(ConfigError, match="seed"):
            seed_key(bad)
    assert seed_key(0) != seed_key((0, 0)) != seed_key((0, 1))


def test_wrong_matrix_size_is_an_error():
    with pytest.raises(ValueError, match="contiguous uint8"):
        fill_random_matrix(np.empty(17, np.uint8), "q4_0", 1, 32, key=1)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan"), 1e6])
def test_unusable_std_is_a_config_error(std):
    with pytest.raises(ConfigError, match="std"):
        random_matrix("f16", 1, 32, seed=1, std=std)
