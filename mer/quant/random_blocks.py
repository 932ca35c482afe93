"""Random but valid weight bytes for every supported dtype, fast enough to write a 25 GB store.

Nothing here quantizes: the bytes are drawn directly in each dtype's GGUF block layout.

1. Every byte of a matrix comes from a counter-based generator (splitmix64: word `i` of stream
   `key` is `mix(key + (i + 1) * golden)`, stored little-endian), so quantized values (q4_0/q4_k
   nibbles, q5_k high bits, q6_k 6-bit values, q8_0 ints) and the 6-bit K-quant scales and mins
   are uniform over their whole range. The stream depends only on the key: byte-identical on any
   machine and numpy version.
2. Each 16-bit field that must stay sane is then replaced through a 65,536-entry table indexed
   by its own random bits: the f16 block scales `d` (and `dmin` for q4_k/q5_k) become uniform in
   `[0.5, 1.5] * nominal` (with a random sign for q4_0, q8_0 and q6_k, whose quantized values
   are centred on -0.5), MXFP4's E8M0 scale bytes become one of two neighbouring powers of two,
   and f16/bf16 elements (the high half of f32 elements) become normal
   quantiles times `std`, so floats are normal with tails cut at 4.3 std.

The nominal scales make the element standard deviation equal `std` (default `1 / sqrt(columns)`,
the usual initialisation), with zero mean: a SwiGLU expert fed an input of RMS 1 then gives an
output of RMS ~0.6.

Throughput (one core, Mixtral-sized q4_0 expert): ~5 GB/s; numba kernels release the GIL.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from functools import lru_cache

import numba
import numpy as np

from mer.compute.dtypes import DType, dtype_by_name
from mer.errors import ConfigError
from mer.compute.expert_format import ExpertFormat

SCALE_SPREAD = (0.5, 1.5)  # block scales are drawn uniformly in this range times the nominal scale
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_KEY_ORIGIN = 0x6D65722D73796E74  # "mer-synt"


def _mix64(value: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2**64)."""
    value = ((value ^ (value >> 30)) * _MIX1) & _MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & _MASK64
    return value ^ (value >> 31)


def seed_key(seed: int | Sequence[int]) -> int:
    """The 64-bit stream key of a seed or of a tuple of seed parts, e.g. (seed, layer, expert)."""
    parts = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    key = _KEY_ORIGIN
    for part in parts:
        if not isinstance(part, (int, np.integer)) or not 0 <= int(part) <= _MASK64:
            raise ConfigError(f"seed {part!r} is not an integer in 0..2**64-1")
        key = _mix64(((key ^ int(part)) + _GOLDEN) & _MASK64)
    return key


@numba.njit(nogil=True, cache=True)
def _fill_words(words: np.ndarray, key: np.uint64) -> None:
    golden = np.uint64(_GOLDEN)
    state = np.uint64(key)
    for index in range(words.size):
        state += golden
        value = state
        value = (value ^ (value >> np.uint64(30))) * np.uint64(_MIX1)
        value = (value ^ (value >> np.uint64(27))) * np.uint64(_MIX2)
        words[index] = value ^ (value >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _remap_u16_fields(data: np.ndarray, start: int, stride: int, count: int, table: np.ndarray) -> None:
    position = start
    for _ in range(count):
        value = table[np.int64(data[position]) | (np.int64(data[position + 1]) << 8)]
        data[position] = value & 0xFF
        data[position + 1] = value >> 8
        position += stride


@numba.njit(nogil=True, cache=True)
def _remap_u8_fields(data: np.ndarray, start: int, stride: int, count: int, table: np.ndarray) -> None:
    for position in range(start, start + stride * count, stride):
        data[position] = table[data[position]]


_MXFP4_VALUE_SQUARE = float(np.mean(np.array([0, 1, 2, 3, 4, 6, 8, 12], dtype=np.float64) ** 2))  # doubled codes


@lru_cache(maxsize=256)
def _mxfp4_exponent_table(std: float) -> np.ndarray:
    """256 E8M0 bytes for the 256 values of a random byte: two neighbouring powers of two (half-scales
    d and 2d), mixed in the share that gives elements of standard deviation `std`."""
    target = std * std / _MXFP4_VALUE_SQUARE  # E[half_scale^2]
    low = 2.0 ** np.floor(np.log2(target) / 2)  # low^2 <= target < 4 low^2
    low_share = (4 * low * low - target) / (3 * low * low)
    exponent = int(np.log2(low)) + 128
    if not 2 <= exponent <= 253:
        raise ConfigError(f"std {std} needs MXFP4 scales beyond E8M0's normal range")
    table = np.full(256, exponent + 1, dtype=np.uint8)
    table[: int(round(low_share * 256))] = exponent
    table.setflags(write=False)
    return table


def fill_random_bytes(out: np.ndarray, key: int) -> None:
    """Fill a contiguous uint8 array with the splitmix64 byte stream of `key`."""
    whole = out.size // 8 * 8
    if out.ctypes.data % 8 == 0:
        _fill_words(out[:whole].view(np.uint64), np.uint64(key))
    else:
        words = np.empty(whole // 8, dtype=np.uint64)
        _fill_words(words, np.uint64(key))
        out[:whole] = words.view(np.uint8)
    if whole < out.size:
        tail = np.empty(out.size // 8 + 1, dtype=np.uint64)
        _fill_words(tail, np.uint64(key))
        out[whole:] = tail.view(np.uint8)[whole : out.size]


def _uniform_moments(low: int, high: int) -> tuple[float, float]:
    """Mean and mean square of an integer drawn uniformly from low..high."""
    values = np.arange(low, high + 1, dtype=np.float64)
    return float(values.mean()), float((values**2).mean())


_SPREAD_MEAN = (SCALE_SPREAD[0] + SCALE_SPREAD[1]) / 2
_SPREAD_MEAN_SQUARE = (SCALE_SPREAD[1] ** 3 - SCALE_SPREAD[0] ** 3) / (3 * (SCALE_SPREAD[1] - SCALE_SPREAD[0]))


def _nominal_scales(dtype: str, std: float) -> dict[str, float]:
    """Nominal block scales giving elements of mean 0 and standard deviation `std`."""
    if dtype in ("q4_0", "q8_0", "q6_k"):
        quant = {"q4_0": (-8, 7), "q8_0": (-128, 127), "q6_k": (-32, 31)}[dtype]
        mean_square = _uniform_moments(*quant)[1] * _SPREAD_MEAN_SQUARE
        if dtype == "q6_k":
            mean_square *= _uniform_moments(-128, 127)[1]  # int8 sub-block scales
        return {"d": std / np.sqrt(mean_square)}
    quant_mean, quant_square = _uniform_moments(0, 15 if dtype == "q4_k" else 31)
    scale_mean, scale_square = _uniform_moments(0, 63)  # 6-bit sub-block scales and mins
    # w = d*sc*q - dmin*m with dmin = quant_mean * d on average, so E[w] = 0.
    unit_square = (
        _SPREAD_MEAN_SQUARE * scale_square * quant_square
        - 2 * _SPREAD_MEAN**2 * quant_mean * scale_mean**2 * quant_mean
        + _SPREAD_MEAN_SQUARE * quant_mean**2 * scale_square
    )
    d = std / np.sqrt(unit_square)
    return {"d": d, "dmin": quant_mean * d}


# f16 scale fields per quantized dtype: name -> byte offset inside the block.
_SCALE_FIELDS: dict[str, dict[str, int]] = {
    "q4_0": {"d": 0},
    "q8_0": {"d": 0},
    "q4_k": {"d": 0, "dmin": 2},
    "q5_k": {"d": 0, "dmin": 2},
    "q6_k": {"d": 208},
}


# Types whose quantized values are centred on -0.5 (q - 8, int8, q - 32) get scales of random
# sign, as real quantizers produce, so that elements have mean 0 and no bias piles up in a matmul.
_SIGNED_SCALES = ("q4_0", "q8_0", "q6_k")


@lru_cache(maxsize=256)
def _scale_table(nominal: float, signed: bool) -> np.ndarray:
    """f16 bit patterns of 65,536 scales evenly spaced in SCALE_SPREAD * nominal (half negated if signed)."""
    low, high = SCALE_SPREAD[0] * nominal, SCALE_SPREAD[1] * nominal
    steps = 32768 if signed else 65536
    values = low + (high - low) * (np.arange(steps) + 0.5) / steps
    if signed:
        values = np.concatenate([values, -values])
    return _frozen_f16_bits(values)


def _frozen_f16_bits(values: np.ndarray) -> np.ndarray:
    """Read-only f16 bit patterns of `values`, which must all be finite and representable."""
    if not np.isfinite(values).all() or np.abs(values).max() > np.finfo(np.float16).max:
        raise ConfigError(f"std gives weights or scales up to {np.abs(values).max():.3g}, beyond f16's range")
    bits = values.astype(np.float16).view(np.uint16)
    bits.setflags(write=False)
    return bits


def default_std(columns: int) -> float:
    """Element standard deviation used when none is given: 1 / sqrt(columns)."""
    return 1.0 / float(np.sqrt(columns))


@lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    normal = statistics.NormalDist()
    return np.array([normal.inv_cdf((index + 0.5) / 65536) for index in range(65536)])


@lru_cache(maxsize=256)
def _float_table(dtype: str, std: float) -> np.ndarray:
    """16-bit patterns of normal quantiles times std: f16 values, or bf16 (= f32 high halves)."""
    values = _normal_quantiles() * std
    if dtype == "f16":
        return _frozen_f16_bits(values)
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    high_halves = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    high_halves.setflags(write=False)
    return high_halves


def _fix_fields(data: np.ndarray, dtype: DType, std: float) -> None:
    """Replace the random bits of every scale field (or float element) by sane values."""
    num_blocks = data.size // dtype.type_size
    if dtype.name == "mxfp4":  # the E8M0 byte; the E2M1 codes stay uniform (mean 0: the table is symmetric)
        _remap_u8_fields(data, 0, dtype.type_size, num_blocks, _mxfp4_exponent_table(std))
    elif dtype.name in _SCALE_FIELDS:
        nominals = _nominal_scales(dtype.name, std)
        for field, offset in _SCALE_FIELDS[dtype.name].items():
            table = _scale_table(nominals[field], dtype.name in _SIGNED_SCALES)
            _remap_u16_fields(data, offset, dtype.type_size, num_blocks, table)
    else:
        table = _float_table(dtype.name, std)
        offset = 2 if dtype.name == "f32" else 0  # f32: the high half; the low mantissa bits stay random
        _remap_u16_fields(data, offset, dtype.type_size, num_blocks, table)


def fill_random_matrix(
    out: np.ndarray, dtype: str | DType, rows: int, columns: int, key: int, std: float | None = None
) -> None:
    """Fill `out` (contiguous uint8, exactly the matrix's bytes) with a random valid matrix."""
    dtype = dtype if isinstance(dtype, DType) else dtype_by_name(dtype)
    nbytes = dtype.matrix_nbytes(rows, columns)
    if out.dtype != np.uint8 or out.size != nbytes or not out.flags.c_contiguous:
        raise ValueError(f"out must be {nbytes} contiguous uint8 bytes for a {rows}x{columns} {dtype.name} matrix")
    std = default_std(columns) if std is None else float(std)
    if not 0 < std < float("inf"):
        raise ConfigError(f"std must be positive and finite, got {std}")
    flat = out.reshape(-1)
    fill_random_bytes(flat, key)
    _fix_fields(flat, dtype, std)


def fill_random_expert(out: np.ndarray, expert_format: ExpertFormat, seed: int | Sequence[int]) -> None:
    """Fill `out` (uint8, payload_nbytes long) with gate ‖ up ‖ down, matrix i keyed (*seed, i).

    Each matrix has the default std (1 / sqrt(its columns)); layout is always native here.
    """
    parts = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    if out.size != expert_format.payload_nbytes:
        raise ValueError(f"out has {out.size} bytes, the payload needs {expert_format.payload_nbytes}")
    for index, matrix in enumerate(expert_format.matrices):
        view = out[matrix.offset : matrix.offset + matrix.nbytes]
        fill_random_matrix(view, matrix.dtype, matrix.rows, matrix.columns, seed_key((*parts, index)))


def random_expert_payload(expert_format: ExpertFormat, seed: int | Sequence[int]) -> np.ndarray:
    """A fresh uint8 array holding one random valid expert payload (native layout)."""
    out = np.empty(expert_format.payload_nbytes, dtype=np.uint8)
    fill_random_expert(out, expert_format, seed)
    return out
