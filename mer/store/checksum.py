"""The store's checksum: CRC-32 (zlib's polynomial), computed with ISA-L where it is installed.

Every expert payload has a crc32 in the manifest (`payload_checksum`), written when the store is
converted and checked by `store verify` and on the read path of the I/O worker
(`mer.io.payload_check`). ISA-L's `crc32` (the `isal` package, folding with PCLMULQDQ) gives the
same values as `zlib.crc32` about nine times faster (measured on this machine's Xeon over 64 MiB:
21 GB/s against 2.4 GB/s; both release the GIL), so the store format did not change for it and a
machine without `isal` still reads every store, only slower. `CRC32_IMPLEMENTATION` names the one
in use (logged by the I/O worker).
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "isal"
except ImportError:  # the same values, ~9x slower
    _crc32 = zlib.crc32
    CRC32_IMPLEMENTATION = "zlib"


def crc32(data, value: int = 0) -> int:
    """CRC-32 of the bytes of `data` (any buffer), continuing from `value`; equal to `zlib.crc32`."""
    return _crc32(data, value) & 0xFFFFFFFF


def payload_checksum(data) -> str:
    """The manifest's checksum of a payload: its crc32 as 8 hex digits."""
    return f"{crc32(data):08x}"
