"""A spawned child as the supervisor knows it: its name, role and process, whether it is ready, how it ended.

The supervisor (`mer.runtime.supervisor`) makes one `Child` per process it starts, and a new one
under the same name for each restart (`mer.runtime.child_restarts`), its `incarnation` one higher.
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import dataclass, field


@dataclass
class Child:
    """A spawned child and what the supervisor knows of it."""

    name: str
    role: str
    index: int | None
    process: multiprocessing.process.BaseProcess
    ready: bool = False
    info: dict = field(default_factory=dict)
    stall: str = ""  # why the watchdog killed it (`Stall.describe`), if it did
    restarted_at: float | None = None  # time.monotonic() when it was started in a dead child's place
    incarnation: int = 0  # processes that held this name before (`RunSpec.incarnation`)

    def describe_exit(self) -> str:
        if self.stall:
            return f"{self.stall}; killed by the watchdog"
        code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"
