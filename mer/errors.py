"""Named exceptions. Every error a user can cause names the file, field or value at fault."""


class MerError(Exception):
    """Base class of every error mer raises on purpose."""


class ConfigError(MerError):
    """A configuration key or value is missing, unknown or out of range."""


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


class StoreExistsError(StoreError):
    """The output directory of a conversion already exists (use --force to replace it)."""


class DiskSpaceError(MerError):
    """The output would not fit on the target filesystem."""


class IoBackendUnavailableError(MerError):
    """A forced I/O backend (io_uring, O_DIRECT) cannot run here; the message says why."""


class IoRequestError(MerError):
    """A read request is malformed (file index, offset, size, destination) or the reader is closed."""


class IoReadError(MerError):
    """A read from an expert file failed or came back short; names the file, offset and size."""

    def __init__(self, message: str, path: str, offset: int, nbytes: int, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.errno = errno

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.offset, self.nbytes, self.errno))


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
