"""Killing a shard group the hard way in tests: SIGKILL to its whole process group, then its run removed as a
later supervisor's stale-run clean-up would (its runtime directory and /dev/shm segments)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mer.runtime.cleanup import remove_run
from tests.support.pipeline_runs import run_ids_in_log


def kill_process_group(group: int, timeout_s: float = 30.0) -> None:
    """SIGKILL to process group `group`; wait until none of it is left."""
    os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"the killed process group {group} did not all exit"
        time.sleep(0.05)


def remove_runs_of_log(guard, log_path: Path) -> None:
    """Register and remove every run named in `log_path` (a killed supervisor could not clean up)."""
    for run_id in run_ids_in_log(log_path):
        guard.add_run(run_id)
        remove_run(run_id, runtime_bases=[guard.runtime_base])
