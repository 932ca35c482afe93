"""Dropping the page cache before a cold-read benchmark (needs root; says whether it worked)."""

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
