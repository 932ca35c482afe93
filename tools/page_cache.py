"""Dropping the page cache before a cold-read benchmark (needs root; says whether it worked), or only
given files' pages (no root)."""

from __future__ import annotations

import os
from pathlib import Path


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache; False where not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def evict_files(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (no root needed; mapped pages stay)."""
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
