"""Checks of a run's runtime directory that only tests make."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mer.errors import RuntimeDirError


def check_runtime_dir_private(path: Path) -> None:
    """Raise RuntimeDirError unless `path` is a real directory owned by this user with mode 0700."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise RuntimeDirError(
            f"runtime directory {path} is not private: mode {stat.S_IMODE(info.st_mode):o}, owner {info.st_uid}"
        )
