"""Errors across processes: an exception travels as `(error_type, message, traceback)`, not `str(e)`.

The side that fails answers `ErrorReply(request_id, *error_fields(error))` (or sends
`ChildFailed(name, *error_fields(error))`); the side that asked calls `raise_remote(reply)`, which
raises `mer.errors.RemoteError` carrying the remote type, message and traceback.
"""

from __future__ import annotations

import traceback as traceback_module
from typing import NamedTuple, NoReturn, Protocol

from mer.errors import RemoteError
from mer.protocol.messages import ErrorReply


class ErrorFields(NamedTuple):
    """The three fields an error crosses a process boundary with."""

    error_type: str
    message: str
    traceback: str


class CarriesError(Protocol):
    error_type: str
    message: str
    traceback: str


def error_type_name(error: BaseException) -> str:
    """`ValueError` for builtins, `mer.errors.StaleSlotError` for everything else."""
    error_class = type(error)
    if error_class.__module__ == "builtins":
        return error_class.__qualname__
    return f"{error_class.__module__}.{error_class.__qualname__}"


def error_fields(error: BaseException) -> ErrorFields:
    """Type name, message and formatted traceback of `error`."""
    formatted = "".join(traceback_module.format_exception(error))
    return ErrorFields(error_type_name(error), str(error), formatted)


def error_reply(request_id: int, error: BaseException) -> ErrorReply:
    """The `ErrorReply` answering request `request_id` that failed with `error`."""
    return ErrorReply(request_id, *error_fields(error))


def raise_remote(reply: CarriesError, origin: str = "") -> NoReturn:
    """Raise `RemoteError` from an `ErrorReply` (or `ChildFailed`); `origin` names the process."""
    raise RemoteError(reply.error_type, reply.message, reply.traceback, origin)
