"""The supervisor: starts the process graph, handshakes, watches the children, and cleans up.

One run:
1. remove stale runs (dead supervisors' `/dev/shm` files and runtime dirs), make a run id, a private
   runtime directory and the slot arena;
2. spawn the I/O worker, the predictor, N compute workers and the router (multiprocessing "spawn",
   each named `mer-<role>[-i]-<run>`), and wait for every child's `Hello` and `Ready` within the
   handshake timeout, extended while the children still waited for keep using CPU or doing I/O (a slow start on
   a busy machine, `mer.runtime.cpu_progress`), up to a hard limit; a child's `ChildFailed` aborts
   start-up with that child's own error. Every
   child's run spec names the job's GGUF (`RunSpec.model`, see `job_model`); a `gate` predictor
   without a model is refused before anything starts;
3. send the job's start message to the router (`StartBenchmark`, `StartGeneration`, `StartServing` or
   `StartPerplexity`) and wait for its `JobDone`, returned as the job's typed summary (`RunSummary`,
   `GenerationSummary`, `PerplexitySummary`); `TokenGenerated` messages before it are handed to
   `on_token` as they arrive, the perplexity job's `PerplexityChunk` to `on_chunk`, the serving job's
   `SequenceToken`, `SequenceDone` and `ServeStep` to `on_serving` (a serving job runs until the
   supervisor is cancelled; `send_to_router` hands it requests);
4. shut down: `Shutdown` to the router, then (once it has exited) to the other children; children
   still starting get SIGTERM at once; whatever is alive after the grace period gets SIGTERM, then
   SIGKILL; unlink the arena and remove the runtime directory (sockets included).

Every process of the run is a member of it (`mer.runtime.membership`): if the supervisor itself is
killed, its children exit on their own within moments and the last one out removes the arena and
the runtime directory (`mer.runtime.supervisor_watch`).

Children are watched through their process sentinels, so a death (kill -9) is seen at once. While
the job runs, a ready child that shows no progress for `stall_timeout_s` (no heartbeat, CPU time or
I/O: stopped, deadlocked; `mer.runtime.stall_watch`) is killed and counts as dead, and so is a compute
worker, the I/O worker or the predictor the router names stuck on its work (`ChildStuck`: no progress for
`job_deadline_s`, e.g. a busy loop; `mer.router.work_deadlines`, `mer.router.predictor_link`). A compute worker,
the predictor or the I/O worker that died of a signal is started again under its name, up to
`max_restarts` per run (the router resubmits the dead compute worker's jobs,
`mer.router.compute_client.ComputeClient`, or fails its requests over to the new I/O worker,
`mer.router.io_client.IoClient`); any other death is reported by name and signal (or stall), the
graph is brought down and `ChildDiedError` raised. SIGINT and
SIGTERM to the supervisor bring the graph down the same way (then `KeyboardInterrupt` or `Terminated` is raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from mer.config import PipelineConfig
from mer.errors import ChildDiedError, PipelineError, ProtocolError
from mer.logging_setup import get_logger
from mer.predict.fusion import check_model_for_predictors
from mer.protocol import (UNKNOWN_REQUEST_ID, ChildFailed, ChildStuck, Heartbeat, Hello, IoWorkerRestarted, JobDone,
                          Ready, SequenceDone, PerplexityChunk, SequenceToken, ServeStep, Shutdown, StartBenchmark,
                          StartGeneration, StartPerplexity, StartServing,
                          TokenGenerated, decode, encode, error_reply)
from mer.runtime.ram_budget import pool_slots
from mer.runtime.cleanup import remove_run, remove_stale_runs
from mer.runtime.cpu_progress import start_limit_s
from mer.runtime.membership import RunMembership
from mer.runtime.paths import create_runtime_dir, new_run_id, process_name, remove_runtime_dir
from mer.runtime.run_spec import RunSpec
from mer.runtime.stall_watch import ProgressMark, StallWatch, heartbeat_interval_s
from mer.shm.arena import SlotArena
from mer.store.reader import ExpertStore
from mer.metrics.summary import GenerationSummary, JobSummary, PerplexitySummary, RunSummary

KILL_WAIT_S = 2.0
PREFAULT_MIN_BYTES_PER_S = 100e6
SENTINEL_REAP_WAIT_S = 1.0  # longest wait for the exit status of a child whose sentinel fired
FAILURE_REPORT_WAIT_S = 1.0  # how long a child's ChildFailed may trail its exit
RESTARTABLE_ROLES = ("compute", "predictor", "io")  # the router resubmits compute jobs and acquires; hints are hints


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


StartMessage = StartBenchmark | StartGeneration | StartServing | StartPerplexity
SERVING_REPORTS = (SequenceToken, SequenceDone, ServeStep)  # the serving job's messages to the supervisor
JOB_REPORTS = (TokenGenerated, PerplexityChunk, *SERVING_REPORTS)  # what only the router sends before JobDone
ROUTER_REPORTS = (JobDone, ChildStuck, *JOB_REPORTS)  # what only the router sends


def job_model(job: StartMessage, gate_model: Path | None = None) -> str | None:
    """The GGUF the children read: a generation's `model`, else a benchmark's `gate_model` (the gate predictor
    replaying a layered trace recorded with its residuals: the configuration checks that), else None."""
    if isinstance(job, (StartGeneration, StartServing, StartPerplexity)):
        return job.model
    return None if gate_model is None else str(gate_model)


def summary_type_of(job: StartMessage) -> type:
    """The typed summary the job's `JobDone` carries."""
    if isinstance(job, StartGeneration):
        return GenerationSummary
    if isinstance(job, StartPerplexity):
        return PerplexitySummary
    return RunSummary


class Supervisor:
    """Runs one job through a freshly started process graph."""

    def __init__(self, config: PipelineConfig, store: ExpertStore, on_job_done=None,
                 job: StartMessage = StartBenchmark(), on_token=None, on_serving=None, on_chunk=None):
        self.on_job_done = on_job_done  # optional coroutine function(summary, supervisor) run before shutdown
        self.job = job  # the router's start message
        self.on_token = on_token  # optional function(TokenGenerated) called as each generated token arrives
        self.on_serving = on_serving  # optional function(message) for the serving job's SERVING_REPORTS
        self.on_chunk = on_chunk  # optional function(PerplexityChunk) called as each chunk is scored
        self.job_started = asyncio.Event()  # every child is ready and the router has the start message
        self._control: zmq.asyncio.Socket | None = None
        self._router_name = b""
        self.model = job_model(job, config.gate_model)
        check_model_for_predictors(config.predictors, self.model,
                                   "benchmark" if isinstance(job, StartBenchmark) else "generation")
        self.config = config
        self.store = store
        self.log = get_logger()
        self.run_id = new_run_id()
        self.children: dict[str, Child] = {}
        self.arena: SlotArena | None = None
        self.membership: RunMembership | None = None
        self.run_spec: RunSpec | None = None
        self.stall_watch = StallWatch()
        self.restarts = 0
        self._events: asyncio.Queue = asyncio.Queue()

    # ---- the whole run ---------------------------------------------------------------------------

    async def run(self) -> JobSummary:
        """Start the graph, run the job, shut down; return the job's summary."""
        remove_stale_runs()
        runtime_dir = create_runtime_dir(self.run_id)
        self.membership = RunMembership.found(self.run_id, runtime_dir)
        zmq_context = zmq.asyncio.Context()
        control = zmq_context.socket(zmq.ROUTER)
        control.setsockopt(zmq.LINGER, 0)
        try:
            self.arena = SlotArena.create(self.run_id, pool_slots(self.config), self.store.manifest.slot_nbytes)
            run = self.run_spec = self._run_info(str(runtime_dir))
            control.bind(run.endpoint("control"))
            self.log.info("run_started_supervisor", run_id=self.run_id, config=self.config.to_dict())
            receiver = asyncio.create_task(self._receive_control(control))
            try:
                self._spawn_all(run)
                await self._handshake()
                router = next(child for child in self.children.values() if child.role == "router")
                await control.send_multipart([router.name.encode(), *encode(self.job)], copy=False)
                self._control, self._router_name = control, router.name.encode()
                self.job_started.set()
                summary = await self._wait_job_done()
                if self.on_job_done is not None:
                    await self.on_job_done(summary, self)
                return summary
            finally:
                self._control = None  # no more requests to the router
                receiver.cancel()
                await self._shutdown(control)
        finally:
            control.close(linger=0)
            zmq_context.term()
            self._cleanup()

    def _run_info(self, runtime_dir: str) -> RunSpec:
        assert self.arena is not None
        return RunSpec(
            run_id=self.run_id, runtime_dir=runtime_dir, arena_path=str(self.arena.path),
            num_slots=self.arena.num_slots, slot_nbytes=self.arena.slot_nbytes,
            store=str(self.store.directory), supervisor_pid=os.getpid(),
            num_compute_workers=self.config.num_compute_workers, config=self.config.to_dict(), model=self.model,
        )

    # ---- spawning and watching -------------------------------------------------------------------

    def _spawn_all(self, run: RunSpec) -> None:
        computes = [("compute", index) for index in range(run.num_compute_workers)]
        for role, index in [("io", None), ("predictor", None), *computes, ("router", None)]:
            self._spawn(run, role, index)

    def _spawn(self, run: RunSpec, role: str, index: int | None, incarnation: int = 0) -> Child:
        name = process_name(role, self.run_id, index)
        spec = dataclasses.replace(run, incarnation=incarnation)
        process = multiprocessing.get_context("spawn").Process(
            target=_child_entry, args=(role, index, name, spec.to_json()), name=name, daemon=False
        )
        process.start()
        child = Child(name, role, index, process, incarnation=incarnation)
        self.children[name] = child
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_sentinel, child)
        self.log.info("child_spawned", child=name, child_pid=process.pid)
        return child

    def _on_sentinel(self, child: Child) -> None:
        asyncio.get_running_loop().remove_reader(child.process.sentinel)
        # The sentinel pipe closes as the child's files are closed, a moment before the kernel lets
        # it be reaped: join(0) can miss the exit status, so wait that moment (microseconds).
        child.process.join(SENTINEL_REAP_WAIT_S)
        self._events.put_nowait(("exited", child))

    async def _receive_control(self, control: zmq.asyncio.Socket) -> None:
        while True:
            identity, *frames = await control.recv_multipart(copy=False)
            name = bytes(identity.buffer).decode(errors="replace")
            try:
                message = decode(frames, expected_kinds=(Hello, Ready, ChildFailed, Heartbeat, *ROUTER_REPORTS))
                self._check_sender(name, message)
            except Exception as error:  # logged, answered and dropped: the control socket keeps serving
                self.log.warning("bad_control_message", child=name, error=str(error))
                with contextlib.suppress(zmq.ZMQError):  # a ROUTER drops what it cannot route; never fatal
                    await control.send_multipart([identity, *encode(error_reply(UNKNOWN_REQUEST_ID, error))])
                continue
            if isinstance(message, Heartbeat):
                self.stall_watch.heartbeat(name, time.monotonic())
                continue
            self._events.put_nowait((type(message).__name__, message))

    def _check_sender(self, identity: str, message) -> None:
        """Only the run's children speak on the control socket, each for itself, and only the router
        reports on the job: raise ProtocolError for anything else (a stray or forged message)."""
        child = self.children.get(identity)
        if child is None:
            raise ProtocolError(f"{type(message).__name__} from {identity!r}, which is not a child of this run")
        if hasattr(message, "name") and message.name != identity and not isinstance(message, ChildStuck):
            raise ProtocolError(f"{type(message).__name__} naming {message.name!r} sent by {identity!r}")
        if isinstance(message, ROUTER_REPORTS) and child.role != "router":
            raise ProtocolError(f"{type(message).__name__} from {identity!r}, which is not the router")

    async def _next_event(self, deadline: float | None):
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns an event that is ready at the
        # moment the task is cancelled and drops the cancel, so a busy graph (a server's steady stream
        # of reports) could never be stopped
        try:
            async with asyncio.timeout(timeout):
                return await self._events.get()
        except TimeoutError:
            return ("timeout", None)

    async def _raise_for(self, kind: str, payload, why: str = "") -> None:
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
                await self._raise_for("exited", killed)
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
            kind, payload = await self._next_event(deadline)
            if kind == "timeout":
                return
            if kind == "ChildFailed" and payload.name == child.name:
                await self._raise_for(kind, payload)

    def handshake_allowance_s(self) -> float:
        """The handshake timeout plus time for the I/O worker to prefault the arena (>= 100 MB/s)."""
        arena_nbytes = pool_slots(self.config) * self.store.manifest.slot_nbytes
        return self.config.handshake_timeout_s + arena_nbytes / PREFAULT_MIN_BYTES_PER_S

    async def _handshake(self) -> None:
        started = time.monotonic()
        allowance = self.handshake_allowance_s()
        deadline, limit = started + allowance, started + start_limit_s(allowance)
        marks = {name: ProgressMark.of(child.process.pid) for name, child in self.children.items()}
        since = started  # when marks were read
        while not all(child.ready for child in self.children.values()):
            kind, payload = await self._next_event(deadline)
            if kind == "timeout":
                waiting = [child for child in self.children.values() if not child.ready]
                working = [child.name for child in waiting
                           if ProgressMark.of(child.process.pid).progressed_since(marks[child.name])]
                now = time.monotonic()
                if working and now < limit:  # slow, not stuck: they keep using CPU or doing I/O (mer.runtime.cpu_progress)
                    self.log.info("child_start_slow", children=working, waited_s=round(now - started, 1))
                    marks = {name: ProgressMark.of(child.process.pid) for name, child in self.children.items()}
                    since, deadline = now, min(now + self.config.handshake_timeout_s, limit)
                    continue
                why = (f"still starting after the limit of {limit - started:.0f} s" if working else
                       f"no CPU used and no I/O done in the last {now - since:.0f} s")
                raise PipelineError(f"start-up timed out after {now - started:.0f} s waiting for: "
                                    f"{', '.join(child.name for child in waiting)} ({why})")
            if kind == "Ready":
                self._on_ready(payload)
            await self._raise_for(kind, payload)

    def _on_ready(self, message: Ready) -> Child:
        """A child is ready: from now on the watchdog expects its progress (`mer.runtime.stall_watch`)."""
        child = self.children[message.name]
        child.ready, child.info = True, dict(message.info)
        self.stall_watch.watch(child.name, child.process.pid, self.config.stall_timeout_s, time.monotonic())
        self.log.info("child_ready", child=message.name, **message.info)
        return child

    async def _wait_job_done(self) -> JobSummary:
        """Pass on the job's tokens until its `JobDone`; meanwhile kill stalled children and restart the
        compute workers and the predictor that die (up to `max_restarts`); any other death ends the run."""
        summary_type = summary_type_of(self.job)
        interval = heartbeat_interval_s(self.config.stall_timeout_s)
        next_check = time.monotonic() + interval
        while True:
            if time.monotonic() >= next_check:
                self._kill_stalled()
                next_check = time.monotonic() + interval
            kind, payload = await self._next_event(next_check)
            if kind == "timeout":
                continue
            if kind == "JobDone":
                return summary_type.from_json_dict(payload.summary)
            if kind == "TokenGenerated":
                if self.on_token is not None:
                    self.on_token(payload)
                continue
            if kind == "PerplexityChunk":
                if self.on_chunk is not None:
                    self.on_chunk(payload)
                continue
            if isinstance(payload, SERVING_REPORTS):
                if self.on_serving is not None:
                    self.on_serving(payload)
                continue
            if kind == "Ready":
                self._on_restart_ready(self._on_ready(payload))
                continue
            if kind == "ChildStuck":
                self._kill_stuck(payload)
                continue
            if kind == "exited" and payload.role in RESTARTABLE_ROLES and self._died_abnormally(payload):
                if self.restarts < self.config.max_restarts:
                    await self._restart(payload)
                    continue
                await self._raise_for(kind, payload, f" (after {self.restarts} restarts, max_restarts)")
            await self._raise_for(kind, payload)

    # ---- the watchdog and restarts ---------------------------------------------------------------

    def _kill_stalled(self) -> None:
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

    def _kill_stuck(self, report: ChildStuck) -> None:
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

    @staticmethod
    def _died_abnormally(child: Child) -> bool:
        """Killed by a signal (kill -9, the OOM killer) or by the watchdog; not an exit with its own error."""
        return bool(child.stall) or (child.process.exitcode or 0) < 0

    async def _restart(self, dead: Child) -> None:
        """Start a new process in the dead child's place (same name and role). The router resubmits the
        compute jobs it had sent to a compute worker once the new one says Hello
        (`mer.router.compute_client.ComputeClient`); of the I/O worker's restart it is told at once
        (`IoWorkerRestarted`), and fails its requests over to the new one (`mer.router.io_client.IoClient`)."""
        assert self.run_spec is not None
        self.restarts += 1
        self.stall_watch.forget(dead.name)
        dead_pid, exit_line = dead.process.pid, dead.describe_exit()
        with contextlib.suppress(ValueError):  # frees its sentinel and pipe (reaped by _on_sentinel)
            dead.process.close()
        child = self._spawn(self.run_spec, dead.role, dead.index, dead.incarnation + 1)
        child.restarted_at = time.monotonic()
        # until Ready, no progress (CPU, I/O) within the handshake timeout is a stall, as at start-up
        self.stall_watch.watch(child.name, child.process.pid, self.config.handshake_timeout_s, time.monotonic())
        self.log.warning("child_restarted", child=child.name, dead_pid=dead_pid, child_pid=child.process.pid,
                         exit=exit_line, restarts=self.restarts)
        if child.role == "io" and self._control is not None:
            await self._control.send_multipart(
                [self._router_name, *encode(IoWorkerRestarted(child.name, child.process.pid))], copy=False)

    def _on_restart_ready(self, child: Child) -> None:
        seconds = None if child.restarted_at is None else round(time.monotonic() - child.restarted_at, 3)
        self.log.warning("child_recovered", child=child.name, child_pid=child.process.pid, seconds=seconds,
                         restarts=self.restarts)

    async def send_to_router(self, message) -> None:
        """Send a control message to the router once the job has started (the serving job's requests)."""
        if self._control is None:
            raise PipelineError("the graph is not serving yet")
        await self._control.send_multipart([self._router_name, *encode(message)], copy=False)

    def status_line(self) -> str:
        """Live figures of the graph: processes alive and their resident memory."""
        alive = [child for child in self.children.values() if child.process.is_alive()]
        rss_mib = sum(_rss_bytes(child.process.pid) for child in alive) / 2**20
        arena_mib = pool_slots(self.config) * self.store.manifest.slot_nbytes / 2**20
        return (f"run {self.run_id}: {len(alive)}/{len(self.children)} processes up, "
                f"RSS {rss_mib:,.0f} MiB, slot arena {arena_mib:,.1f} MiB")

    # ---- shutdown --------------------------------------------------------------------------------

    async def _shutdown(self, control: zmq.asyncio.Socket) -> None:
        """Shutdown in two stages, then terminate, then kill; every child is joined before returning.

        The router, which drives the job, is stopped first and the other children only once it has
        exited (or the grace period is over): stopped the other way round, a router still in its job
        could fail on workers that are going away, and report that instead of the real cause."""
        deadline = time.monotonic() + self.config.shutdown_grace_s
        alive = [child for child in self.children.values() if child.process.is_alive()]
        for stage in ([c for c in alive if c.role == "router"], [c for c in alive if c.role != "router"]):
            for child in stage:
                await self._stop_child(control, child)
            await _wait_exit(stage, max(0.0, deadline - time.monotonic()))
        for child in alive:
            if child.process.is_alive():
                self.log.warning("child_terminated", child=child.name, reason="no exit within the grace period")
                child.process.terminate()
        await _wait_exit(alive, KILL_WAIT_S)
        for child in alive:
            if child.process.is_alive():
                self.log.warning("child_killed", child=child.name)
                child.process.kill()
        loop = asyncio.get_running_loop()
        for child in self.children.values():
            child.process.join(KILL_WAIT_S)
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(child.process.sentinel)
            if child.process.exitcode is not None:
                child.process.close()  # frees the sentinel and pipe; a child still alive here keeps them

    async def _stop_child(self, control: zmq.asyncio.Socket, child: Child) -> None:
        """Send `Shutdown` to a ready child; terminate one still starting (SIGTERM)."""
        if not child.process.is_alive():
            return
        if not child.ready:
            # Still starting: it listens for Shutdown only once ready (and a Shutdown sent before it
            # connected is dropped), and it has nothing to drain, so it is stopped at once.
            self.log.warning("child_terminated", child=child.name, reason="not ready at shutdown")
            child.process.terminate()
            return
        with contextlib.suppress(zmq.ZMQError):  # gone meanwhile: the signals of _shutdown still apply
            await control.send_multipart([child.name.encode(), *encode(Shutdown("graph shutting down"))],
                                         flags=zmq.NOBLOCK, copy=False)

    def _cleanup(self) -> None:
        """Leave the run and remove its resources: every child has been joined (or killed) by now, so
        the supervisor is the last member; a child that outlives even SIGKILL finds them gone."""
        if self.membership is not None:
            self.membership.leave()
        if self.arena is not None:
            self.arena.destroy()
        remove_runtime_dir(self.run_id)
        remove_run(self.run_id)


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _traceback_detail(error_type: str, traceback: str) -> str:
    """The remote traceback for the user, only for unexpected errors (mer's own errors explain themselves)."""
    if not traceback or error_type.startswith("mer.errors."):
        return ""
    return f"\n{traceback}"


async def _wait_exit(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(child.process.is_alive() for child in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _child_entry(role: str, index: int | None, name: str, run_json: str) -> None:
    """Spawn target: import the role's module in the child and run it."""
    from workers import entry

    entry.main(role, index, name, run_json)
