"""Messages to ZeroMQ frames and back; no pickle.

Frame 0 is `bytes([kind, version])`, frame 1 the msgpack body (a list of the fields in order),
frames 2.. the numpy arrays of the message, each referenced from the body as
`{"__array__": frame index - 2, "dtype": "<f4", "shape": [...]}`. `encode` returns the arrays
themselves as frames, so `socket.send_multipart(frames, copy=False)` sends them without a copy.
`decode` checks everything against the field annotations of the message class and raises
`ProtocolError` naming the message, field and offending value. A decoded array is a read-only view
onto its received frame (no copy): keep the frame's message alive as long as the array is in use.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Any

import msgpack
import numpy as np

from mer.errors import ConfigError, ProtocolError
# The modules that declare messages: each registers its own in MESSAGE_TYPES, compiled into _SCHEMAS below.
from mer.protocol import (  # noqa: F401
    compute_messages, control_messages, io_messages, job_messages, predictor_messages, remote_errors,
    serving_messages, shard_messages,
)
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import MESSAGE_TYPES, ArraySpec, MapValues

ARRAY_KEY = "__array__"
_ARRAY_REFERENCE_KEYS = frozenset((ARRAY_KEY, "dtype", "shape"))
_SCALAR_TYPES = (int, float, str, bool)
_MAX_JSON_DEPTH = 16

Frame = bytes | bytearray | memoryview | np.ndarray | Any  # Any: zmq.Frame (has .bytes and .buffer)


class _Mismatch(Exception):
    """Internal: a value does not fit its schema; `path` grows as the error leaves containers."""

    def __init__(self, expected: str, got: str, path: str = ""):
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.path = path


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _ArrayFrames:
    """The array frames of one message being decoded; each must be referenced exactly once."""

    def __init__(self, frames: Sequence[Frame]):
        self.buffers = [_frame_buffer(frame, index + 2) for index, frame in enumerate(frames)]
        self.taken = [False] * len(frames)

    def take(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.buffers):
            raise _Mismatch(f"an array frame index in 0..{len(self.buffers) - 1}", _describe(index), f".{ARRAY_KEY}")
        if self.taken[index]:
            raise _Mismatch("an array frame not referenced before", f"index {index} again", f".{ARRAY_KEY}")
        self.taken[index] = True
        return self.buffers[index]


def _frame_buffer(frame: Frame, position: int) -> memoryview:
    """A flat byte view of a frame (bytes, memoryview, numpy array or zmq.Frame) without copying."""
    try:
        view = memoryview(getattr(frame, "buffer", frame))
        if view.ndim == 1 and view.format == "B":
            return view
        return view.cast("B") if view.nbytes else memoryview(b"")
    except TypeError as error:
        raise ProtocolError(f"frame {position} is not a contiguous buffer: {error}") from None


_NO_ARRAYS = _ArrayFrames(())


# --- checkers: one per field, compiled once from the annotations -----------------------------------

Checker = Callable[[Any, _ArrayFrames], Any]


def _exact_checker(wanted: type, expected: str) -> Checker:
    def check_exact(value: Any, arrays: _ArrayFrames) -> Any:
        if type(value) is not wanted:
            raise _Mismatch(expected, _describe(value))
        return value

    return check_exact


def _check_float(value: Any, arrays: _ArrayFrames) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _Mismatch("a number", _describe(value))


_SIMPLE_CHECKERS = {int: _exact_checker(int, "an integer"), float: _check_float,
                    bool: _exact_checker(bool, "a boolean"), str: _exact_checker(str, "a string")}


def _fails(checker: Checker, value: Any) -> bool:
    """Whether `checker` rejects `value` (used only to locate an error after the fact)."""
    try:
        checker(value, _NO_ARRAYS)
    except _Mismatch:
        return True
    return False


def _optional_checker(value_checker: Checker) -> Checker:
    def check_optional(value: Any, arrays: _ArrayFrames) -> Any:
        return None if value is None else value_checker(value, arrays)

    return check_optional


def _list_checker(item_checker: Checker) -> Checker:
    def check_list(value: Any, arrays: _ArrayFrames) -> list:
        if type(value) is not list:
            raise _Mismatch("a list", _describe(value))
        try:
            return [item_checker(item, arrays) for item in value]
        except _Mismatch as mismatch:
            index = next(index for index, item in enumerate(value) if _fails(item_checker, item))
            mismatch.path = f"[{index}]{mismatch.path}"
            raise

    return check_list


def _record_checker(record_type: type) -> Checker:
    """A NamedTuple travels as a list of its fields, in order."""
    names = record_type._fields
    hints = typing.get_type_hints(record_type)
    checkers = [_checker_for(hints[name]) for name in names]
    expected = f"a list of {len(names)} fields ({', '.join(names)})"
    exact_types = [hints[name] for name in names]  # the fast path: every field already of its exact type

    def check_record(value: Any, arrays: _ArrayFrames) -> tuple:
        if type(value) is list and list(map(type, value)) == exact_types:
            return tuple.__new__(record_type, value)
        if type(value) is not list or len(value) != len(checkers):
            raise _Mismatch(expected, _describe(value))
        try:
            return record_type._make([checker(item, arrays) for checker, item in zip(checkers, value)])
        except _Mismatch as mismatch:
            name = next(name for name, checker, item in zip(names, checkers, value) if _fails(checker, item))
            mismatch.path = f".{name}{mismatch.path}"
            raise

    return check_record


def _check_json_value(value: Any, depth: int) -> None:
    if value is None or type(value) in _SCALAR_TYPES:
        return
    if depth >= _MAX_JSON_DEPTH:
        raise _Mismatch(f"values nested at most {_MAX_JSON_DEPTH} deep", "deeper nesting")
    if type(value) is list:
        for index, item in enumerate(value):
            try:
                _check_json_value(item, depth + 1)
            except _Mismatch as mismatch:
                mismatch.path = f"[{index}]{mismatch.path}"
                raise
        return
    _check_map(value, depth + 1, scalars_only=False)


def _check_map(value: Any, depth: int, scalars_only: bool) -> None:
    if type(value) is not dict:
        raise _Mismatch("a map with string keys", _describe(value))
    for key, item in value.items():
        if type(key) is not str:
            raise _Mismatch("a string key", _describe(key))
        try:
            if scalars_only and not (item is None or type(item) in _SCALAR_TYPES):
                raise _Mismatch("an int, float, str, bool or None", _describe(item))
            _check_json_value(item, depth)
        except _Mismatch as mismatch:
            mismatch.path = f"[{key!r}]{mismatch.path}"
            raise


def _map_checker(values: MapValues) -> Checker:
    scalars_only = values is MapValues.SCALARS

    def check_map(value: Any, arrays: _ArrayFrames) -> dict:
        _check_map(value, 0, scalars_only)
        return value

    return check_map


def _array_checker(spec: ArraySpec) -> Checker:
    dtypes = {dtype.str: dtype for dtype in spec.numpy_dtypes}
    wire_names = " or ".join(repr(name) for name in dtypes)
    axes = ", ".join(spec.axes)
    expected = f"an array reference {{{ARRAY_KEY!r}: index, 'dtype': {wire_names}, 'shape': [{axes}]}}"

    def check_array(value: Any, arrays: _ArrayFrames) -> np.ndarray:
        if type(value) is not dict or value.keys() != _ARRAY_REFERENCE_KEYS:
            raise _Mismatch(expected, _describe(value))
        dtype = dtypes.get(value["dtype"]) if type(value["dtype"]) is str else None
        if dtype is None:
            raise _Mismatch(f"dtype {wire_names} ({spec.dtype_names})", _describe(value["dtype"]), ".dtype")
        shape = value["shape"]
        if type(shape) is not list or len(shape) != len(spec.axes) or not all(
            type(size) is int and size >= 0 for size in shape
        ):
            raise _Mismatch(f"a shape [{axes}] of non-negative integers", _describe(shape), ".shape")
        buffer = arrays.take(value[ARRAY_KEY])
        nbytes = math.prod(shape) * dtype.itemsize
        if buffer.nbytes != nbytes:
            raise _Mismatch(f"a frame of {nbytes} bytes for shape {shape}", f"{buffer.nbytes} bytes", ".shape")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    return check_array


def _checker_for(annotation: Any, top_level: bool = False) -> Checker:
    """Compile the wire check of one field annotation (see mer.protocol.schema).

    Arrays are allowed only as top-level fields, so nested checks never touch the array frames.
    """
    if annotation in _SIMPLE_CHECKERS:
        return _SIMPLE_CHECKERS[annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        marker = typing.get_args(annotation)[1]
        if isinstance(marker, ArraySpec) and top_level:
            return _array_checker(marker)
        if isinstance(marker, MapValues):
            return _map_checker(marker)
    if origin is types.UnionType and type(None) in typing.get_args(annotation):
        (value_type,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _optional_checker(_checker_for(value_type))
    if origin is list:
        return _list_checker(_checker_for(typing.get_args(annotation)[0]))
    if isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields"):
        return _record_checker(annotation)
    raise TypeError(f"no wire schema for the annotation {annotation!r}")


@dataclass(frozen=True)
class _FieldSchema:
    name: str
    check: Checker
    array: ArraySpec | None


@dataclass(frozen=True)
class _MessageSchema:
    header: bytes
    fields: tuple[_FieldSchema, ...]


def _compile_schema(message_type: type) -> _MessageSchema:
    hints = typing.get_type_hints(message_type, include_extras=True)
    field_schemas = []
    for field in fields(message_type):
        annotation = hints[field.name]
        marker = getattr(annotation, "__metadata__", (None,))[0]  # Annotated[T, marker]
        array = marker if isinstance(marker, ArraySpec) else None
        field_schemas.append(_FieldSchema(field.name, _checker_for(annotation, top_level=True), array))
    return _MessageSchema(bytes([message_type.KIND, message_type.VERSION]), tuple(field_schemas))


_SCHEMAS: dict[type, _MessageSchema] = {cls: _compile_schema(cls) for cls in MESSAGE_TYPES.values()}


# --- encode -----------------------------------------------------------------------------------------


def _array_reference(name: str, spec: ArraySpec, value: Any, arrays: list[np.ndarray]) -> dict:
    if not isinstance(value, np.ndarray) or value.dtype not in spec.numpy_dtypes or value.ndim != len(spec.axes):
        got = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else _describe(value)
        raise ProtocolError(f"{name}: expected a {spec.dtype_names} array [{', '.join(spec.axes)}], got {got}")
    dtype = spec.numpy_dtypes[spec.numpy_dtypes.index(value.dtype)]
    arrays.append(np.ascontiguousarray(value, dtype=dtype))
    return {ARRAY_KEY: len(arrays) - 1, "dtype": dtype.str, "shape": list(value.shape)}


def _pack_body(name: str, schema: _MessageSchema, body: list) -> bytes:
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        for field, value in zip(schema.fields, body):
            try:
                msgpack.packb(value, use_bin_type=True)
            except (TypeError, ValueError, OverflowError):
                raise ProtocolError(f"{name}.{field.name}: cannot encode {_describe(value)}: {error}") from None
        raise ProtocolError(f"{name}: cannot encode: {error}") from None


def encode(message: Any) -> list[bytes | np.ndarray]:
    """Frames of `message`: header, msgpack body, then its arrays (contiguous, not copied if already)."""
    message_type = type(message)
    schema = _SCHEMAS.get(message_type)
    if schema is None:
        raise ProtocolError(f"{message_type.__name__} is not a protocol message")
    arrays: list[np.ndarray] = []
    body = []
    for field in schema.fields:
        value = getattr(message, field.name)
        if field.array is not None:
            value = _array_reference(f"{message_type.__name__}.{field.name}", field.array, value, arrays)
        body.append(value)
    return [schema.header, _pack_body(message_type.__name__, schema, body), *arrays]


# --- decode -----------------------------------------------------------------------------------------


def _message_type(header: bytes, expected_kinds: Collection | None) -> type:
    if len(header) != 2:
        raise ProtocolError(f"frame 0 must be 2 bytes (kind, version), got {len(header)} bytes")
    kind_number, version = header
    try:
        kind = MessageKind(kind_number)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_number}") from None
    message_type = MESSAGE_TYPES[kind]
    if expected_kinds is not None and kind not in expected_kinds and message_type not in expected_kinds:
        names = sorted(getattr(item, "__name__", None) or MESSAGE_TYPES[item].__name__ for item in expected_kinds)
        raise ProtocolError(f"unexpected message {message_type.__name__} here; expected one of {names}")
    if version != message_type.VERSION:
        raise ProtocolError(
            f"{message_type.__name__}: protocol version {version}, this side speaks {message_type.VERSION}"
        )
    return message_type


def _unpack_body(name: str, frame: Frame, num_fields: int) -> list:
    buffer = _frame_buffer(frame, 1)
    try:
        body = msgpack.unpackb(buffer, raw=False, use_list=True, strict_map_key=True)
    except Exception as error:  # msgpack raises several types (ExtraData, FormatError, ValueError...)
        raise ProtocolError(f"{name}: body is not valid msgpack: {type(error).__name__}: {error}") from None
    if type(body) is not list:
        raise ProtocolError(f"{name}: body must be a list of fields, got {_describe(body)}")
    if len(body) != num_fields:
        raise ProtocolError(f"{name}: body has {len(body)} fields, expected {num_fields}")
    return body


def decode(frames: Sequence[Frame], expected_kinds: Collection | None = None) -> Any:
    """The message in `frames`, fully checked; `expected_kinds` holds message kinds or classes."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (kind, body), got {len(frames)}")
    header = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    message_type = _message_type(header, expected_kinds)
    name = message_type.__name__
    schema = _SCHEMAS[message_type]
    body = _unpack_body(name, frames[1], len(schema.fields))
    arrays = _ArrayFrames(frames[2:])
    values = []
    for field, value in zip(schema.fields, body):
        try:
            values.append(field.check(value, arrays))
        except _Mismatch as mismatch:
            raise ProtocolError(
                f"{name}.{field.name}{mismatch.path}: expected {mismatch.expected}, got {mismatch.got}"
            ) from None
    unused = [index for index, taken in enumerate(arrays.taken) if not taken]
    if unused:
        raise ProtocolError(f"{name}: array frames {unused} are not referenced by any field")
    try:
        message = message_type(*values)
    except ConfigError as error:  # a message that checks its fields when built (StartGeneration)
        raise ProtocolError(f"{name}: {error}") from None
    if hasattr(message, "check"):
        message.check()
    return message


def check_expert_ids(name: str, expert_ids: Sequence[int], num_experts: int) -> None:
    """Raise ProtocolError if message `name` names an expert that is not in 0..num_experts-1 (a
    well-formed message a receiver must still refuse before it changes any state)."""
    unknown = [expert for expert in expert_ids if not 0 <= expert < num_experts]
    if unknown:
        raise ProtocolError(f"{name}: expert ids {unknown[:8]} are not in 0..{num_experts - 1}")
