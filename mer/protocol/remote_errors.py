"""Errors across processes: an exception travels as `(error_type, message, traceback)`, not `str(e)`.

The side that fails answers `ErrorReply(request_id, *error_fields(error))` (or sends
`ChildFailed(name, *error_fields(error))`); the side that asked calls `raise_remote(reply)`, which
raises `mer.errors.RemoteError` carrying the remote type, message and traceback. `ErrorReply`, the
message any request/reply socket may answer with, is declared here.
"""

from __future__ import annotations

import traceback as traceback_module
from typing import NamedTuple, NoReturn

from mer.errors import RemoteError
from mer.protocol.control_messages import ChildFailed
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import message


# --- any request/reply socket ---------------------------------------------------------------------


UNKNOWN_REQUEST_ID = -1  # the request_id of an ErrorReply to a message too malformed to name its request


@message(MessageKind.ERROR_REPLY)
class ErrorReply:
    """A request failed on the other side; raise it locally with `raise_remote`. A malformed message
    is answered with `request_id` UNKNOWN_REQUEST_ID (the asker logs it and drops it)."""

    request_id: int
    error_type: str
    message: str
    traceback: str


class ErrorFields(NamedTuple):
    """The three fields an error crosses a process boundary with."""

    error_type: str  # `ValueError` for builtins, `mer.errors.StaleSlotError` for everything else
    message: str
    traceback: str


def error_fields(error: BaseException) -> ErrorFields:
    """Type name, message and formatted traceback of `error`."""
    error_class = type(error)
    module = "" if error_class.__module__ == "builtins" else f"{error_class.__module__}."
    return ErrorFields(module + error_class.__qualname__, str(error), "".join(traceback_module.format_exception(error)))


def error_reply(request_id: int, error: BaseException) -> ErrorReply:
    """The `ErrorReply` answering request `request_id` that failed with `error`."""
    return ErrorReply(request_id, *error_fields(error))


def raise_remote(reply: ErrorReply | ChildFailed, origin: str = "") -> NoReturn:
    """Raise `RemoteError` from an `ErrorReply` (or `ChildFailed`); `origin` names the process."""
    raise RemoteError(reply.error_type, reply.message, reply.traceback, origin)
