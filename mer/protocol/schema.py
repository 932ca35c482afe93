"""The vocabulary messages are declared in (`mer.protocol.*_messages`) and checked by (`mer.protocol.codec`).

- `ArraySpec` and `MapValues` annotate array and map fields: an array travels as its own zero-copy
  frame with a fixed dtype and axis count; a map's values are scalars or JSON-like values;
- `@message(kind, version)` makes a class a frozen message, tags it and registers it in
  `MESSAGE_TYPES`, so every kind is declared exactly once.
"""

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Annotated, Any, dataclass_transform

import numpy as np


@dataclass(frozen=True)
class ArraySpec:
    """What an array field must be: its dtype and one name per axis (the axis count is fixed).

    `other_dtypes` lists further dtypes the field may have instead (the remote shards' hidden states:
    float32, or float16 as an option); the array reference on the wire names the one it has."""

    dtype: str
    axes: tuple[str, ...]
    other_dtypes: tuple[str, ...] = ()

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    @property
    def numpy_dtypes(self) -> tuple[np.dtype, ...]:
        """Every dtype the field may have, `dtype` first (little-endian)."""
        return (self.numpy_dtype, *(np.dtype(name).newbyteorder("<") for name in self.other_dtypes))

    @property
    def dtype_names(self) -> str:
        return " or ".join((self.dtype, *self.other_dtypes))


class MapValues(IntEnum):
    """What the values of a `dict` field may be (keys are always strings)."""

    SCALARS = 1  # int, float, str, bool or None
    JSON = 2  # scalars, lists and str-keyed dicts of them, nested


ScalarMap = Annotated[dict[str, Any], MapValues.SCALARS]
JsonMap = Annotated[dict[str, Any], MapValues.JSON]


MESSAGE_TYPES: dict[IntEnum, type] = {}


@dataclass_transform(frozen_default=True)
def message(kind: IntEnum, version: int = 1):
    """Class decorator: make a frozen dataclass, tag it with `kind` and `version`, register it."""

    def register(cls):
        if kind in MESSAGE_TYPES:
            raise TypeError(f"message kind {kind.name} is declared twice")
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.KIND = kind
        cls.VERSION = version
        MESSAGE_TYPES[kind] = cls
        return cls

    return register


def equal_with_arrays(self, other) -> bool:
    """Field-wise equality in which arrays compare by dtype, shape and values."""
    if type(other) is not type(self):
        return NotImplemented
    for field in fields(self):
        mine, theirs = getattr(self, field.name), getattr(other, field.name)
        if isinstance(mine, np.ndarray):
            if mine.dtype != theirs.dtype or mine.shape != theirs.shape or not np.array_equal(mine, theirs):
                return False
        elif mine != theirs:
            return False
    return True
