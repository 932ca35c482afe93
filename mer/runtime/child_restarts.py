"""A child's death mid-run: the watchdog's kills, and the restart of a new process in the dead one's place.

While the job runs, a ready child that shows no progress for `stall_timeout_s` (no heartbeat, CPU time
or I/O: stopped, deadlocked; `mer.runtime.stall_watch`) is killed and counts as dead, and so is a
compute worker, the I/O worker or the predictor the router names stuck on its work (`ChildStuck`: no
progress for `job_deadline_s`, e.g. a busy loop; `mer.router.work_deadlines`,
`mer.router.predictor_link`). A compute worker, the predictor or the I/O worker that died of a signal
(or was killed by the watchdog) is started again under its name, up to `max_restarts` per run
(`child_restarted`, then `child_recovered` once it is ready): the router resubmits the dead compute
worker's jobs (`mer.router.compute_client.ComputeClient`), or, told at once of the I/O worker's restart
(`IoWorkerRestarted`), fails its requests over to the new I/O worker, which writes no slot until the
router has dropped the dead one's leases (`mer.router.io_client.IoClient`, `mer.io.restart_fence`).
Any other death ends the run (`mer.runtime.supervisor`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

from mer.config import PipelineConfig
from mer.protocol import ChildStuck, IoWorkerRestarted, encode
from mer.runtime.run_spec import RunSpec
from mer.runtime.spawned_child import Child
from mer.runtime.stall_watch import StallWatch

RESTARTABLE_ROLES = ("compute", "predictor", "io")  # the router resubmits compute jobs and acquires; hints are hints


class ChildRestarts:
    """Kills the children that stall or are stuck, and restarts the restartable ones that die; counts restarts."""

    def __init__(self, config: PipelineConfig, children: dict[str, Child], stall_watch: StallWatch,
                 spawn: Callable[[RunSpec, str, int | None, int], Child], log):
        self.config, self.children, self.stall_watch, self.spawn, self.log = config, children, stall_watch, spawn, log
        self.restarts = 0

    def kill_stalled(self) -> None:
        """Kill (SIGKILL) every watched child that made no progress within its timeout; its sentinel then
        reports it as a death, named as a stall."""
        for stall in self.stall_watch.stalls(time.monotonic()):
            child = self.children[stall.name]
            child.stall = stall.describe()
            self.stall_watch.forget(stall.name)
            self.log.error("child_stalled", child=stall.name, child_pid=stall.pid, silent_s=round(stall.silent_s, 2),
                           state=stall.state)
            with contextlib.suppress(ProcessLookupError):
                os.kill(stall.pid, signal.SIGKILL)

    def kill_stuck(self, report: ChildStuck) -> None:
        """Kill (SIGKILL) the child the router found stuck on its work (`job_deadline_s`); its sentinel then
        reports it as a death, named with the work it was stuck on. A report on a process that is no longer
        the child's (already dead, restarted meanwhile) is only logged."""
        child = self.children.get(report.name)
        if (child is None or report.pid not in (0, child.process.pid) or not child.ready
                or not child.process.is_alive()):  # pid 0: the router does not know it (the I/O worker's, at first)
            self.log.warning("child_stuck_ignored", child=report.name, child_pid=report.pid, work=report.work,
                             reason="not that child's live process")
            return
        child.stall = (f"stuck: no progress on {report.work} for {report.silent_s:.1f} s "
                       f"(job_deadline_s {self.config.job_deadline_s:g} s)")
        self.stall_watch.forget(child.name)
        self.log.error("child_stuck", child=child.name, child_pid=child.process.pid, work=report.work,
                       silent_s=round(report.silent_s, 2), job_deadline_s=self.config.job_deadline_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signal.SIGKILL)

    def has_restarts_left(self) -> bool:
        return self.restarts < self.config.max_restarts

    def is_restartable(self, child: Child) -> bool:
        """A compute worker, the predictor or the I/O worker that died abnormally (restarts left or not)."""
        return child.role in RESTARTABLE_ROLES and self._died_abnormally(child)

    @staticmethod
    def _died_abnormally(child: Child) -> bool:
        """Killed by a signal (kill -9, the OOM killer) or by the watchdog; not an exit with its own error."""
        return bool(child.stall) or (child.process.exitcode or 0) < 0

    async def restart(self, dead: Child, run_spec: RunSpec | None, control, router_name: bytes) -> None:
        """Start a new process in the dead child's place (same name and role). The router resubmits the
        compute jobs it had sent to a compute worker once the new one says Hello
        (`mer.router.compute_client.ComputeClient`); of the I/O worker's restart it is told at once
        (`IoWorkerRestarted` on `control`, once the job has started), and fails its requests over to the new
        one (`mer.router.io_client.IoClient`)."""
        assert run_spec is not None
        self.restarts += 1
        self.stall_watch.forget(dead.name)
        dead_pid, exit_line = dead.process.pid, dead.describe_exit()
        with contextlib.suppress(ValueError):  # frees its sentinel and pipe (reaped by the supervisor's _on_sentinel)
            dead.process.close()
        child = self.spawn(run_spec, dead.role, dead.index, dead.incarnation + 1)
        child.restarted_at = time.monotonic()
        # until Ready, no progress (CPU, I/O) within the handshake timeout is a stall, as at start-up
        self.stall_watch.watch(child.name, child.process.pid, self.config.handshake_timeout_s, time.monotonic())
        self.log.warning("child_restarted", child=child.name, dead_pid=dead_pid, child_pid=child.process.pid,
                         exit=exit_line, restarts=self.restarts)
        if child.role == "io" and control is not None:
            await control.send_multipart(
                [router_name, *encode(IoWorkerRestarted(child.name, child.process.pid))], copy=False)

    def recovered(self, child: Child) -> None:
        """A restarted child is ready (`child_recovered`, with the seconds since its restart)."""
        seconds = None if child.restarted_at is None else round(time.monotonic() - child.restarted_at, 3)
        self.log.warning("child_recovered", child=child.name, child_pid=child.process.pid, seconds=seconds,
                         restarts=self.restarts)
