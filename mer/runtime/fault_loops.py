"""The busy loops `MER_WORK_FAULTS` injects into a worker (`mer.environment`), for the tests of the
router's job deadlines (`mer.router.work_deadlines`): they use the CPU, as a bug or long work would."""

from __future__ import annotations

import time

from mer.logging_setup import flush_log


def spin_forever(log, **fields) -> None:
    """An injected bug: log `work_fault_injected` (written now: the event loop that writes the log is
    held from here on), then a busy loop that never ends and reports nothing."""
    log.warning("work_fault_injected", fault="spin", **fields)
    flush_log()
    while True:
        pass


def busy_for(seconds: float) -> None:
    """Injected slow work: use the CPU for `seconds`."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass
