"""What this host can run, probed once per test session: io_uring through the liburing package.

The liburing wheel may not run on every CPU (its 2026.3.30 binary dies with SIGILL on an AVX2-only
EPYC): there mer's `auto` backend falls back to preadv with the probe's reason, a forced `uring`
fails with that reason, and the tests that need a working io_uring are skipped, saying why.
"""

from __future__ import annotations

import pytest

from mer.io.backend import probe_io_uring

URING_PROBLEM = probe_io_uring()
AUTO_BACKEND = "preadv" if URING_PROBLEM else "uring"  # what `--io-backend auto` picks on a disk store
requires_io_uring = pytest.mark.skipif(URING_PROBLEM is not None,
                                       reason=f"io_uring cannot run on this host: {URING_PROBLEM}")


def forced_uring_error(o_direct_problem: str) -> str:
    """The start of the error a forced `uring` gives here, for a store whose O_DIRECT problem is given."""
    if URING_PROBLEM:
        return f"io_backend 'uring' cannot run here: {URING_PROBLEM}"
    return f"io_backend 'uring' needs O_DIRECT: {o_direct_problem}"
