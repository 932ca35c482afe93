"""A fatal event of the run becomes the error the user sees: a child's death, or its own `ChildFailed`.

A death is reported by the child's name, pid and signal (or the watchdog's reason: `child_died`,
`ChildDiedError`). A child that exits with an error code has sent `ChildFailed` just before, and the
user gets that child's own error (`child_failed`, `PipelineError`; the remote traceback only for
unexpected errors). A failure caused by a death (the router losing a killed compute worker) may be
reported before the death itself is seen: then the death, the cause, is what the user is told.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from mer.errors import ChildDiedError, PipelineError
from mer.runtime.spawned_child import Child

FAILURE_REPORT_WAIT_S = 1.0  # how long a child's ChildFailed may trail its exit


class ChildFailures:
    """Raises the error for a fatal event, reading further events (`next_event`) where a report may trail."""

    def __init__(self, children: dict[str, Child], next_event: Callable[[float | None], Awaitable[tuple]], log):
        self.children, self.next_event, self.log = children, next_event, log

    async def raise_for(self, kind: str, payload, why: str = "") -> None:
        """Turn a fatal event (a child's exit or its ChildFailed) into the error the user sees."""
        if kind == "exited":
            await self._raise_reported_failure(payload)
            self.log.error("child_died", child=payload.name, child_pid=payload.process.pid,
                           exit=payload.describe_exit())
            raise ChildDiedError(f"{payload.name} (pid {payload.process.pid}) died: {payload.describe_exit()}{why}")
        if kind == "ChildFailed":
            killed = self._child_killed_by_signal()
            if killed is not None and killed.name != payload.name:
                # a failure caused by a death (e.g. the router losing a killed compute worker) may be
                # reported before the death itself is seen: the death is the cause the user needs
                self.log.warning("child_failed", child=payload.name, error_type=payload.error_type,
                                 message=payload.message, after=f"{killed.name} died")
                await self.raise_for("exited", killed)
            self.log.error("child_failed", child=payload.name, error_type=payload.error_type,
                           message=payload.message, traceback=payload.traceback)
            raise PipelineError(f"{payload.name} failed: {payload.error_type}: {payload.message}"
                                + _traceback_detail(payload.error_type, payload.traceback))

    def _child_killed_by_signal(self) -> Child | None:
        """A child that has died of a signal (kill -9, OOM killer), if any."""
        return next((child for child in self.children.values()
                     if not child.process.is_alive() and (child.process.exitcode or 0) < 0), None)

    async def _raise_reported_failure(self, child: Child) -> None:
        """A child that exits with an error code has sent ChildFailed just before; its sentinel may
        still be seen first. Wait briefly for that report, so the user gets the child's own error."""
        if not child.process.exitcode or child.process.exitcode < 0:
            return  # a clean exit or a signal: there is no report to wait for
        deadline = time.monotonic() + FAILURE_REPORT_WAIT_S
        while True:
            kind, payload = await self.next_event(deadline)
            if kind == "timeout":
                return
            if kind == "ChildFailed" and payload.name == child.name:
                await self.raise_for(kind, payload)


def _traceback_detail(error_type: str, traceback: str) -> str:
    """The remote traceback for the user, only for unexpected errors (mer's own errors explain themselves)."""
    if not traceback or error_type.startswith("mer.errors."):
        return ""
    return f"\n{traceback}"
