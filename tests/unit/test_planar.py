"""The planar layout: a lossless, size-preserving permutation with the documented byte positions."""

from __future__ import annotations

import numpy as np
import pytest

from mer.compute.dtypes import SUPPORTED_DTYPES, dtype_by_name
from mer.errors import ShapeError, UnsupportedDTypeError
from mer.quant.planar import has_planar_form, quant_bytes_per_block, scales_offset, to_planar
from tests.support.quant_helpers import from_planar, random_matrix

SEED = 20261129


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("rows, columns", [(1, 32), (3, 96), (64, 512), (17, 4096)])
def test_round_trip_is_exact_and_keeps_the_size(dtype: str, rows: int, columns: int) -> None:
    native = random_matrix(dtype, rows, columns, (SEED, rows, columns)).reshape(-1)
    planar = to_planar(dtype, native, rows, columns)
    assert planar.dtype == np.uint8 and planar.size == native.size
    assert np.array_equal(np.sort(planar), np.sort(native))  # a permutation of the same bytes
    assert np.array_equal(from_planar(dtype, planar, rows, columns), native)


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_block_bytes_sit_where_the_docstring_says(dtype: str) -> None:
    rows, columns = 5, 160
    info = dtype_by_name(dtype)
    blocks_per_row, quant_bytes = columns // 32, quant_bytes_per_block(dtype)
    native = random_matrix(dtype, rows, columns, SEED).reshape(rows, blocks_per_row, info.type_size)
    planar = to_planar(dtype, native.reshape(-1), rows, columns)
    scales_at = scales_offset(dtype, rows, columns)
    assert scales_at == rows * blocks_per_row * quant_bytes
    for row in range(rows):
        for block in range(blocks_per_row):
            index = row * blocks_per_row + block
            quants = planar[index * quant_bytes : (index + 1) * quant_bytes]
            scale = planar[scales_at + 2 * index : scales_at + 2 * index + 2]
            assert np.array_equal(quants, native[row, block, 2:])
            assert np.array_equal(scale, native[row, block, :2])


def test_a_block_range_of_a_row_is_contiguous() -> None:
    """Column-slicing `down` needs no copy: blocks [b0, b1) of a row are one byte run per part."""
    rows, columns = 4, 512
    native = random_matrix("q4_0", rows, columns, SEED).reshape(rows, 16, 18)
    planar = to_planar("q4_0", native.reshape(-1), rows, columns)
    row, first, last = 2, 5, 11
    run = planar[(row * 16 + first) * 16 : (row * 16 + last) * 16]
    assert np.array_equal(run, native[row, first:last, 2:].reshape(-1))


@pytest.mark.parametrize("dtype", [name for name in SUPPORTED_DTYPES if name not in ("q4_0", "q8_0")])
def test_other_dtypes_have_no_planar_form(dtype: str) -> None:
    rows, columns = 3, 256
    native = random_matrix(dtype, rows, columns, SEED).reshape(-1)
    assert not has_planar_form(dtype)
    assert np.array_equal(to_planar(dtype, native, rows, columns), native)
    assert np.array_equal(from_planar(dtype, native, rows, columns), native)


def test_wrong_size_names_the_shape() -> None:
    native = random_matrix("q4_0", 2, 64, SEED).reshape(-1)
    with pytest.raises(ShapeError, match="2x96"):
        to_planar("q4_0", native, 2, 96)
    with pytest.raises(ShapeError, match="multiple of the q8_0 block size"):
        from_planar("q8_0", native, 2, 50)


def test_non_bytes_and_unknown_dtypes_are_refused() -> None:
    with pytest.raises(UnsupportedDTypeError, match="uint8"):
        to_planar("q4_0", np.zeros(36, dtype=np.int8), 1, 64)
    with pytest.raises(UnsupportedDTypeError, match="q3_k"):
        to_planar("q3_k", np.zeros(36, dtype=np.uint8), 1, 64)
