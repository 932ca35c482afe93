"""The weight data types mer stores and computes, and their block geometry.

Names are the lower-case GGUF names. A row of `n` elements of a quantized type is `n / block_size`
blocks of `type_size` bytes each, in the GGUF's own byte layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mer.errors import ShapeError, UnsupportedDTypeError


@dataclass(frozen=True)
class DType:
    """One supported weight type: its name, GGML enum value and block geometry."""

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int
    type_size: int

    def row_nbytes(self, num_columns: int) -> int:
        """Bytes of one row of `num_columns` elements; the count must be a multiple of the block."""
        if num_columns <= 0 or num_columns % self.block_size:
            raise ShapeError(
                f"a row of {num_columns} elements is not a positive multiple of the "
                f"{self.name} block size {self.block_size}"
            )
        return num_columns // self.block_size * self.type_size

    def matrix_nbytes(self, num_rows: int, num_columns: int) -> int:
        if num_rows <= 0:
            raise ShapeError(f"a {self.name} matrix needs a positive row count, got {num_rows}")
        return num_rows * self.row_nbytes(num_columns)


def _make(name: str) -> DType:
    ggml_type = GGMLQuantizationType[name.upper()]
    return DType(name, ggml_type, *GGML_QUANT_SIZES[ggml_type])


SUPPORTED_DTYPES: dict[str, DType] = {
    name: _make(name) for name in ("f32", "f16", "bf16", "q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "mxfp4")
}
_BY_GGML = {dtype.ggml_type: dtype for dtype in SUPPORTED_DTYPES.values()}


def dtype_by_name(name: str) -> DType:
    """The DType called `name` (case-insensitive), or an error listing the supported names."""
    dtype = SUPPORTED_DTYPES.get(name.lower())
    if dtype is None:
        raise UnsupportedDTypeError(
            f"unsupported dtype {name!r}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    return dtype


def dtype_by_ggml(ggml_type: int, where: str = "") -> DType:
    """The DType of a GGML type id; `where` names the tensor for the error message."""
    dtype = _BY_GGML.get(ggml_type)  # type: ignore[call-overload]
    if dtype is None:
        try:
            type_name = GGMLQuantizationType(ggml_type).name
        except ValueError:
            type_name = f"type id {ggml_type}"
        place = f" in {where}" if where else ""
        raise UnsupportedDTypeError(
            f"unsupported tensor type {type_name}{place}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    return dtype
