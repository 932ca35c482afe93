"""Choose and open the expert read backend: io_uring with O_DIRECT where it works, else preadv.

`open_reader("auto", ...)` probes io_uring (a ring is set up and READV looked up: fails on old
kernels and in sandboxes that block io_uring) and O_DIRECT on every file (an open and a one-page
read; ramfs, procfs and tmpfs before Linux 6.6 refuse the open with EINVAL).  A file in memory
(tmpfs, ramfs) counts as without O_DIRECT even where the kernel accepts the flag: there an
"O_DIRECT" read is a memory copy that io_uring would do inline, stalling the event loop, while the
preadv threads do it off the loop.  Both work: `UringReader`.  Otherwise: `PreadvReader`,
with O_DIRECT if the files allow it, buffered if not.  The reader's `reason` says what was chosen
and why, and is logged.  A forced `"uring"` that cannot run raises `IoBackendUnavailableError`; it
never falls back silently.  A forced `"preadv"` uses O_DIRECT where the files allow it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Literal

from mer.config import READ_DEADLINE_S
from mer.errors import ConfigError, IoBackendUnavailableError
from mer.compute.expert_format import PAGE_SIZE
from mer.io.preadv_reader import PreadvReader
from mer.io.reader_base import ExpertReader
from mer.logging_setup import get_logger

ReaderKind = Literal["auto", "uring", "preadv"]
READER_KINDS: tuple[ReaderKind, ...] = ("auto", "uring", "preadv")

log = get_logger()

IN_MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}
_libc = ctypes.CDLL(None, use_errno=True)


def filesystem_magic(path: Path) -> int:
    """The `f_type` of statfs(2) for `path` (the filesystem's magic number)."""
    result = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), result) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(path))
    return struct.unpack_from("l", result)[0] & 0xFFFFFFFF


# Run in a child interpreter: a liburing binary built for newer CPUs dies with SIGILL (seen with
# the 2026.3.30 wheel on an AVX2-only EPYC), which no `except` in this process could survive.
_URING_PROBE = """
import sys
try:
    import liburing
except ImportError as error:
    print(f"the liburing package cannot be imported ({error})"); sys.exit(0)
ring = liburing.Ring()
try:
    liburing.io_uring_queue_init(2, ring)
except OSError as error:
    print(f"io_uring_setup failed: [Errno {error.errno}] {error.strerror} "
          "(a kernel without io_uring, or io_uring blocked by seccomp or kernel.io_uring_disabled)"); sys.exit(0)
try:
    probe = liburing.io_uring_get_probe_ring(ring)
    if probe is None:
        print("the io_uring opcode probe failed"); sys.exit(0)
    try:
        supported = liburing.io_uring_opcode_supported(probe, liburing.io_uring_op.IORING_OP_READV)
    finally:
        liburing.io_uring_free_probe(probe)
    print("" if supported else "this kernel's io_uring cannot READV")
finally:
    liburing.io_uring_queue_exit(ring)
"""
URING_PROBE_TIMEOUT_S = 30.0


@functools.cache
def probe_io_uring() -> str | None:
    """None if an io_uring that can READV is available to this process, else the reason why not.

    The probe sets up a ring and looks READV up in a child interpreter (once per process), so that
    a liburing binary this CPU cannot run is reported as a reason instead of killing the caller."""
    try:
        result = subprocess.run([sys.executable, "-c", _URING_PROBE], capture_output=True, text=True,
                                timeout=URING_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the io_uring probe did not finish within {URING_PROBE_TIMEOUT_S:g} s"
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        why = " (its binary uses instructions this CPU lacks)" if name == "SIGILL" else ""
        return f"the liburing package crashed with {name} while setting up a ring{why}"
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"the io_uring probe failed (exit status {result.returncode}): {detail[0]}"
    return result.stdout.strip() or None


def probe_o_direct(path: Path) -> str | None:
    """None if `path` can be opened and read with O_DIRECT, else the reason why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as error:
        return (
            f"{path}: open with O_DIRECT failed: [Errno {error.errno}] {error.strerror} "
            "(the filesystem does not support O_DIRECT)"
        )
    try:
        if os.fstat(fd).st_size >= PAGE_SIZE:
            with mmap.mmap(-1, PAGE_SIZE) as page:
                with memoryview(page) as view:
                    os.preadv(fd, [view], 0)
    except OSError as error:
        return f"{path}: a read with O_DIRECT failed: [Errno {error.errno}] {error.strerror}"
    finally:
        os.close(fd)
    filesystem = IN_MEMORY_FILESYSTEMS.get(filesystem_magic(path))
    if filesystem:
        return f"{path} is on {filesystem}, in memory: O_DIRECT would be a plain memory copy"
    return None


def open_reader(
    kind: ReaderKind,
    files: list[Path],
    buffer: memoryview,
    queue_depth: int,
    *,
    register_buffers: bool = False,
    registration_unit: int = PAGE_SIZE,
    read_deadline_s: float = READ_DEADLINE_S,
) -> ExpertReader:
    """Open the read backend `kind` over `files`, reading into slices of `buffer`.

    Call from a coroutine: the reader binds to the running event loop.  `buffer` is the mmap-backed
    memory every destination lies in (the arena's data region); the uring backend registers it
    with the kernel when `register_buffers` is set, in pieces that are multiples of
    `registration_unit` (pass the slot size).  A read still in flight `read_deadline_s` after it was
    started fails as hung (`mer.io.reader_base`).  Close the reader with `await reader.close()`.
    """
    if kind not in READER_KINDS:
        raise ConfigError(f"io_backend must be one of {READER_KINDS}, not {kind!r}")
    paths = [Path(path) for path in files]
    o_direct_problem = next(filter(None, (probe_o_direct(path) for path in paths)), None)
    uring_problem = probe_io_uring() if kind != "preadv" else None
    if kind == "uring" and uring_problem:
        raise IoBackendUnavailableError(f"io_backend 'uring' cannot run here: {uring_problem}")
    if kind == "uring" and o_direct_problem:
        raise IoBackendUnavailableError(f"io_backend 'uring' needs O_DIRECT: {o_direct_problem}")
    if kind != "preadv" and not uring_problem and not o_direct_problem:
        from mer.io.uring_reader import UringReader

        reason = "io_uring forced" if kind == "uring" else "io_uring and O_DIRECT available"
        reader: ExpertReader = UringReader(
            paths,
            buffer,
            queue_depth,
            register_buffers=register_buffers,
            registration_unit=registration_unit,
            reason=reason,
            read_deadline_s=read_deadline_s,
        )
    else:
        reason = fallback_reason(kind, uring_problem, o_direct_problem)
        reader = PreadvReader(paths, queue_depth, o_direct=o_direct_problem is None, reason=reason,
                              read_deadline_s=read_deadline_s)
    log.info("io_backend_selected", backend=reader.name, o_direct=reader.o_direct, reason=reader.reason)
    return reader


def fallback_reason(kind: ReaderKind, uring_problem: str | None, o_direct_problem: str | None) -> str:
    """Why the preadv backend runs, and whether it reads with O_DIRECT."""
    mode = "buffered" if o_direct_problem else "O_DIRECT"
    if kind == "preadv":
        detail = f": {o_direct_problem}" if o_direct_problem else ""
        return f"preadv forced ({mode}){detail}"
    problems = [f"io_uring unavailable: {uring_problem}"] if uring_problem else []
    if o_direct_problem:
        problems.append(f"O_DIRECT unavailable: {o_direct_problem}")
    return f"fell back to preadv ({mode}): " + "; ".join(problems)
