"""The precision of hidden states and outputs between the router and remote shards (`ShardLayerRequest`).

`f32` (the default) sends the float32 values as they are: the round trip is bit-exact (NaN payloads,
-0.0 and subnormals included), so a cluster's tokens equal one machine's. `f16` halves the bytes:
`to_wire` rounds each value as numpy's float32 -> float16 conversion does (round to nearest, ties to
even; values below float16's range become subnormals or zero) and `from_wire` widens back exactly;
the relative error of a value in float16's normal range (6.1e-5 .. 65504) is at most 2**-11. A finite
value too large for float16 is an error naming how many and the largest, never a silent inf.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from mer.errors import ProtocolError

WireDtype = Literal["f32", "f16"]
WIRE_DTYPES: tuple[str, ...] = get_args(WireDtype)
_NUMPY_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16)}


def to_wire(values: np.ndarray, wire_dtype: WireDtype) -> np.ndarray:
    """float32 `values` as they travel: themselves (f32) or rounded to float16 (f16)."""
    if wire_dtype not in _NUMPY_DTYPES:
        raise ProtocolError(f"wire dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if values.dtype != np.float32:
        raise ProtocolError(f"to_wire takes float32 values, got {values.dtype}")
    if wire_dtype == "f32":
        return np.ascontiguousarray(values)
    with np.errstate(over="ignore"):  # an overflow is found and named below
        narrowed = values.astype(np.float16)
    overflowed = np.isinf(narrowed) & np.isfinite(values)
    if overflowed.any():
        raise ProtocolError(f"{int(overflowed.sum())} values do not fit float16 (largest magnitude "
                            f"{float(np.abs(values[overflowed]).max()):.6g} > 65504): send them as f32")
    return narrowed


def from_wire(values: np.ndarray) -> np.ndarray:
    """float32 values from what travelled: the array itself (float32) or widened exactly (float16)."""
    if values.dtype == np.float32:
        return values
    if values.dtype == np.float16:
        return values.astype(np.float32)
    raise ProtocolError(f"from_wire takes float32 or float16 values, got {values.dtype}")


def wire_dtype_of(values: np.ndarray) -> WireDtype:
    """The wire dtype name of an array that travelled (`f32` or `f16`)."""
    for name, dtype in _NUMPY_DTYPES.items():
        if values.dtype == dtype:
            return name
    raise ProtocolError(f"{values.dtype} is not a wire dtype ({', '.join(WIRE_DTYPES)})")
