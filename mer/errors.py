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


class StoreError(MerError):
    """An expert store is missing, incomplete, of another version, or corrupt."""


class StoreExistsError(StoreError):
    """The output directory of a conversion already exists (use --force to replace it)."""


class DiskSpaceError(MerError):
    """The output would not fit on the target filesystem."""


class ChecksumError(StoreError):
    """One or more expert payloads do not match the checksum in the manifest."""

    def __init__(self, message: str, bad_experts: list[int]):
        super().__init__(message)
        self.bad_experts = bad_experts
