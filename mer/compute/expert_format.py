"""How one expert's three matrices lie in its payload bytes.

An expert is a SwiGLU FFN: `out = down · (silu(gate · x) ⊙ (up · x))`. Its payload is
gate (W1) ‖ up (W3) ‖ down (W2), each matrix in row-major GGUF block layout:

- gate and up: `rows = d_ff`, `columns = d_model` (one row per hidden unit);
- down: `rows = d_model`, `columns = d_ff`.

Some architectures (gpt-oss) add biases: the payload then continues, after the matrices, with
float32 `gate_bias [d_ff]` ‖ `up_bias [d_ff]` ‖ `down_bias [d_model]` (`has_biases`), and
`activation` names the gated activation (`mer.compute.expert_activation`; "silu" by default).
Both are written to the manifest only when they differ from the defaults.

`columns` is GGML's ne0 (the contiguous, blocked dimension), `rows` is ne1. Matrix `layout` is
"native" (the GGUF bytes verbatim) or "planar" (the same bytes permuted by `mer.quant.planar`
into a kernel-friendly order; identical size, lossless).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.compute.dtypes import DType, dtype_by_name
from mer.compute.expert_activation import ACTIVATIONS
from mer.errors import ShapeError

MATRIX_NAMES = ("gate", "up", "down")
LAYOUTS = ("native", "planar")
PAGE_SIZE = 4096


def round_up(value: int, multiple: int = PAGE_SIZE) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class MatrixSpec:
    """One matrix of an expert: where it starts in the payload and its type and shape."""

    name: str
    dtype: str
    rows: int
    columns: int
    offset: int
    nbytes: int
    layout: str = "native"

    @property
    def dtype_info(self) -> DType:
        return dtype_by_name(self.dtype)

    def validate(self) -> None:
        if self.name not in MATRIX_NAMES:
            raise ShapeError(f"matrix name {self.name!r} is not one of {MATRIX_NAMES}")
        if self.layout not in LAYOUTS:
            raise ShapeError(f"matrix {self.name}: layout {self.layout!r} is not one of {LAYOUTS}")
        expected = self.dtype_info.matrix_nbytes(self.rows, self.columns)
        if expected != self.nbytes:
            raise ShapeError(
                f"matrix {self.name}: {self.rows}x{self.columns} {self.dtype} needs {expected} bytes, "
                f"manifest says {self.nbytes}"
            )


@dataclass(frozen=True)
class ExpertFormat:
    """The byte layout shared by all experts of one MoE layer."""

    d_model: int
    d_ff: int
    matrices: tuple[MatrixSpec, MatrixSpec, MatrixSpec]
    activation: str = "silu"
    has_biases: bool = False

    @property
    def gate(self) -> MatrixSpec:
        return self.matrices[0]

    @property
    def up(self) -> MatrixSpec:
        return self.matrices[1]

    @property
    def down(self) -> MatrixSpec:
        return self.matrices[2]

    @property
    def matrices_nbytes(self) -> int:
        return sum(matrix.nbytes for matrix in self.matrices)

    @property
    def biases_nbytes(self) -> int:
        return 4 * (2 * self.d_ff + self.d_model) if self.has_biases else 0

    @property
    def payload_nbytes(self) -> int:
        return self.matrices_nbytes + self.biases_nbytes

    def bias_ranges(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(start, stop) byte ranges of the gate, up and down biases in the payload."""
        gate = self.matrices_nbytes
        up = gate + 4 * self.d_ff
        down = up + 4 * self.d_ff
        return (gate, up), (up, down), (down, down + 4 * self.d_model)

    @property
    def read_nbytes(self) -> int:
        """Bytes one O_DIRECT read of this payload transfers (rounded up to a page)."""
        return round_up(self.payload_nbytes)

    @property
    def slice_quantum(self) -> int:
        """The smallest d_ff slice that starts and ends on block boundaries of every matrix."""
        return int(np.lcm.reduce([matrix.dtype_info.block_size for matrix in self.matrices]))

    @classmethod
    def build(
        cls, d_model: int, d_ff: int, dtypes: tuple[str, str, str], layout: str = "native",
        activation: str = "silu", has_biases: bool = False,
    ) -> "ExpertFormat":
        """Lay out gate ‖ up ‖ down back to back with the given dtypes (then the biases, if any)."""
        shapes = ((d_ff, d_model), (d_ff, d_model), (d_model, d_ff))
        offset = 0
        specs = []
        for name, dtype_name, (rows, columns) in zip(MATRIX_NAMES, dtypes, shapes):
            nbytes = dtype_by_name(dtype_name).matrix_nbytes(rows, columns)
            specs.append(MatrixSpec(name, dtype_by_name(dtype_name).name, rows, columns, offset, nbytes, layout))
            offset += nbytes
        return cls(d_model, d_ff, (specs[0], specs[1], specs[2]), activation, has_biases)

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ShapeError(f"expert activation {self.activation!r} is not one of {ACTIVATIONS}")
        offset = 0
        for name, matrix, shape in zip(
            MATRIX_NAMES, self.matrices, ((self.d_ff, self.d_model),) * 2 + ((self.d_model, self.d_ff),)
        ):
            matrix.validate()
            if matrix.name != name or (matrix.rows, matrix.columns) != shape or matrix.offset != offset:
                raise ShapeError(
                    f"matrix {matrix.name}: expected {name} of shape {shape} at offset {offset}, got "
                    f"{(matrix.rows, matrix.columns)} at {matrix.offset}"
                )
            offset += matrix.nbytes

    def to_dict(self) -> dict:
        data = {
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "matrices": [matrix.__dict__.copy() for matrix in self.matrices],
        }
        if self.activation != "silu":
            data["activation"] = self.activation
        if self.has_biases:
            data["has_biases"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertFormat":
        matrices = tuple(MatrixSpec(**matrix) for matrix in data["matrices"])
        if len(matrices) != 3:
            raise ShapeError(f"an expert has 3 matrices, the format lists {len(matrices)}")
        expert_format = cls(int(data["d_model"]), int(data["d_ff"]), matrices,  # type: ignore[arg-type]
                            str(data.get("activation", "silu")), bool(data.get("has_biases", False)))
        expert_format.validate()
        return expert_format


@dataclass(frozen=True)
class ExpertPayload:
    """An expert's bytes (a uint8 array, e.g. a view of a shared-memory slot) and their format."""

    format: ExpertFormat
    data: np.ndarray

    def matrix_bytes(self, matrix: MatrixSpec) -> np.ndarray:
        return self.data[matrix.offset : matrix.offset + matrix.nbytes]

    def biases(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(gate, up, down) float32 bias vectors (views), or None when the format has none."""
        if not self.format.has_biases:
            return None
        gate, up, down = (self.data[start:stop].view(np.float32) for start, stop in self.format.bias_ranges())
        return gate, up, down
