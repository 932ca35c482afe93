"""Named exceptions. Every error a user can cause names the file, field or value at fault.

`mer.cli.exit_status` turns them (and OSError, a closed pipe, signals) into one line and an exit
status at the top of the CLI; library code raises, it never prints or exits.
"""

import errno as _errno
import os


class MerError(Exception):
    """Base class of every error mer raises on purpose."""


class ConfigError(MerError):
    """A configuration key or value is missing, unknown or out of range."""


class UsageError(ConfigError):
    """The command line itself is wrong (a flag's value, a combination of flags): exit status 2."""


class UnsupportedDTypeError(MerError):
    """A tensor or request uses a data type mer cannot store or compute."""


class ShapeError(MerError):
    """A tensor shape does not fit the model geometry or the dtype's block size."""


class GGUFError(MerError):
    """A GGUF file is not readable, not a MoE model, or inconsistent."""


class UnsupportedModelError(GGUFError):
    """A GGUF model mer cannot run: unsupported architecture, dense model, missing hyper-parameter."""


class TokenizerError(MerError):
    """A GGUF vocabulary is missing, malformed or of an unsupported kind, or a token id is invalid."""


class ContextLengthError(MerError):
    """A prompt (plus the tokens to generate) does not fit in the model's context or KV cache."""


class StoreError(MerError):
    """An expert store is missing, incomplete, of another version, or corrupt."""


class ExpertUnusableError(MerError):
    """One expert could not be read or used (its read failed or hung, its payload is corrupt, its output
    holds NaN or inf, no slot is left in service for it): the request that needed it fails, while a
    server goes on with its other requests (`expert_unusable_types`)."""


def expert_unusable_types() -> frozenset[str]:
    """The qualified names (`mer.errors.IoReadError`, ...) of `ExpertUnusableError` and its subclasses, as
    an error that crossed processes names its type (`mer.protocol.remote_errors.error_fields`)."""
    found, pending = set(), [ExpertUnusableError]
    while pending:
        error_class = pending.pop()
        found.add(f"{error_class.__module__}.{error_class.__qualname__}")
        pending.extend(error_class.__subclasses__())
    return frozenset(found)


class PayloadChecksumError(StoreError, ExpertUnusableError):
    """An expert payload read into a slot does not match its checksum in the manifest; names the
    expert (layer, index), the file and the offset. The expert is not computed with."""


class StoreExistsError(StoreError):
    """The output directory of a conversion already exists (use --force to replace it)."""


class DiskSpaceError(MerError):
    """The output would not fit on the target filesystem."""


class IoBackendUnavailableError(MerError):
    """A forced I/O backend (io_uring, O_DIRECT) cannot run here; the message says why."""


class IoRequestError(MerError):
    """A read request is malformed (file index, offset, size, destination) or the reader is closed."""


class IoReadError(ExpertUnusableError):
    """A read from an expert file failed or came back short; names the file, offset and size."""

    def __init__(self, message: str, path: str, offset: int, nbytes: int, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.errno = errno

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.offset, self.nbytes, self.errno))


class IoReadHungError(IoReadError):
    """A read did not complete within `read_deadline_s`: the device hangs. Names the file, offset and size;
    `released` (local to the reader's process) resolves when the kernel has ended the read, so that its
    destination may be written by anyone else again."""

    def __init__(self, message: str, path: str, offset: int, nbytes: int, errno: int | None = None,
                 seconds: float = 0.0, released=None, cancel: str = ""):
        super().__init__(message, path, offset, nbytes, errno)
        self.seconds = seconds
        self.released = released
        self.cancel = cancel

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.offset, self.nbytes, self.errno, self.seconds))


class SlotsQuarantinedError(ExpertUnusableError):
    """An Acquire names more experts than the slots left in service can hold (hung reads quarantine theirs)."""


class NonFiniteError(ExpertUnusableError):
    """An expert's output or the logits hold NaN or infinity; names the layer and expert, or 'logits'."""


class ProtocolError(MerError):
    """A message on a socket is malformed: unknown kind, wrong version, field count, type or array."""


class RemoteError(MerError):
    """An error raised in another process and sent back as an ErrorReply (type, message, traceback)."""

    def __init__(self, error_type: str, message: str, traceback: str = "", origin: str = ""):
        super().__init__(f"{origin}: {error_type}: {message}" if origin else f"{error_type}: {message}")
        self.error_type = error_type
        self.remote_message = message
        self.remote_traceback = traceback
        self.origin = origin

    def __reduce__(self):
        return (type(self), (self.error_type, self.remote_message, self.remote_traceback, self.origin))


class TraceError(MerError):
    """A routing trace is malformed, of another version, or does not fit the store's geometry."""


class EventLogError(MerError):
    """A run's event log is malformed, of another schema version, or lacks the events a summary needs."""


class SlotStateError(MerError):
    """A slot-table call does not fit the slot's state (e.g. a release of a slot that is not leased)."""


class StaleSlotError(MerError):
    """A slot no longer holds the (expert, generation) a message refers to."""


class ArenaError(MerError):
    """The shared-memory slot arena cannot be created or attached, does not fit, or is malformed."""


class RuntimeDirError(MerError):
    """A run's private runtime directory cannot be created or is not private."""


class PipelineError(MerError):
    """The process graph could not start, or failed while running; the message names the child."""


class ChildDiedError(PipelineError):
    """A child process of the graph exited unexpectedly (crash, kill -9, OOM kill)."""


class IoWorkerRestartedError(PipelineError):
    """The I/O worker died and was restarted while a request waited for it: the request is void, and its
    asker tries again on the new worker (`mer.router.dispatcher`); it never reaches the user."""


class Terminated(BaseException):
    """SIGTERM arrived: like KeyboardInterrupt (not an Exception, so no `except Exception` swallows it),
    it unwinds the stack, so `with` blocks clean up (a half-written store is removed) before exit 143."""


# Short reasons for the OSErrors a user can cause, for one-line messages ("PATH: permission denied").
_OS_ERROR_REASONS = {
    _errno.ENOSPC: "no space left on device (the disk is full)",
    _errno.EDQUOT: "disk quota exceeded (the disk is full for this user)",
    _errno.EACCES: "permission denied",
    _errno.EPERM: "operation not permitted",
    _errno.ENOENT: "no such file or directory",
    _errno.ENOTDIR: "a component of the path is not a directory",
    _errno.EISDIR: "is a directory",
    _errno.EROFS: "read-only filesystem",
    _errno.EEXIST: "already exists",
    _errno.ENAMETOOLONG: "file name too long",
}


def os_error_reason(error: OSError) -> str:
    """A short reason for an OSError, without the path: `permission denied`."""
    return _OS_ERROR_REASONS.get(error.errno or -1) or error.strerror or str(error)


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """`PATH: reason` for an OSError: its own file name (or `path`), then a short reason."""
    reason = os_error_reason(error)
    where = error.filename if error.filename is not None else path
    if where is None:
        return reason
    target = f" -> {os.fsdecode(error.filename2)}" if error.filename2 is not None else ""
    return f"{os.fsdecode(where)}{target}: {reason}"


class KeyFileError(MerError):
    """A CURVE key file (`mer-pipeline keys`) is missing, malformed, too widely readable, already exists,
    or does not match its pair; names the file."""


class ShardMapError(ConfigError):
    """An expert -> shard map is malformed or does not fit the model or the cluster; names the file and field."""


class ShardExpertsError(MerError):
    """A shard group was asked for experts it does not serve (or that its store does not have); names the
    shard and the experts."""


class ShardUnavailableError(MerError):
    """A remote shard group did not answer within the deadline and the experts it was asked for have no
    other live replica (`mer.router.remote_shards`); names the shard and the experts. Never answered with
    zeros or a partial result."""

    def __init__(self, message: str, shard: int = -1, experts: tuple[int, ...] = ()):
        super().__init__(message)
        self.shard = shard
        self.experts = experts

    def __reduce__(self):
        return (type(self), (str(self), self.shard, self.experts))
