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
3. send the job's start message to the router (`StartBenchmark`, `StartGeneration`, `StartServing`,
   `StartPerplexity` or `StartShardGroup`) and wait for its `JobDone`, returned as the job's typed
   summary (`RunSummary`, `GenerationSummary`, `PerplexitySummary`, `ShardSummary`); `TokenGenerated`
   messages before it are handed to `on_token` as they arrive, the perplexity job's `PerplexityChunk`
   to `on_chunk`, the serving job's
   `SequenceToken`, `SequenceDone` and `ServeStep` to `on_serving` (a serving job runs until the
   supervisor is cancelled; `send_to_router` hands it requests);
4. shut down: `Shutdown` to the router, then (once it has exited) to the other children; children
   still starting get SIGTERM at once; whatever is alive after the grace period gets SIGTERM, then
   SIGKILL; unlink the arena and remove the runtime directory (sockets included).

Every process of the run is a member of it (`mer.runtime.membership`): if the supervisor itself is
killed, its children exit on their own within moments and the last one out removes the arena and
the runtime directory (`mer.runtime.supervisor_watch`).

Children are watched through their process sentinels, so a death (kill -9) is seen at once. While
the job runs, a child that stalls or that the router names stuck is killed, and a compute worker, the
predictor or the I/O worker that dies of a signal (or that the watchdog killed) is started again under
its name, up to `max_restarts` per run (`mer.runtime.child_restarts`); any other death is reported by
name and signal (or stall), the graph is brought down (`mer.runtime.graph_shutdown`) and
`ChildDiedError` raised. SIGINT and SIGTERM to the supervisor bring the graph down the same way (then
`KeyboardInterrupt` or `Terminated` is raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import zmq
import zmq.asyncio

from mer.config import PipelineConfig
from mer.errors import PipelineError, ProtocolError
from mer.logging_setup import get_logger
from mer.predict.fusion import check_model_for_predictors
from mer.protocol import (UNKNOWN_REQUEST_ID, ChildFailed, ChildStuck, Heartbeat, Hello, JobDone,
                          Ready, SequenceDone, PerplexityChunk, SequenceToken, ServeStep, StartBenchmark,
                          StartGeneration, StartPerplexity, StartServing, StartShardGroup,
                          TokenGenerated, decode, encode, error_reply)
from mer.runtime.ram_budget import pool_slots
from mer.runtime.child_failures import ChildFailures
from mer.runtime.child_restarts import ChildRestarts
from mer.runtime.cleanup import remove_run, remove_stale_runs
from mer.runtime.cpu_progress import start_limit_s
from mer.runtime.graph_shutdown import shut_down
from mer.runtime.membership import RunMembership
from mer.runtime.paths import create_runtime_dir, new_run_id, process_name, remove_runtime_dir
from mer.runtime.run_spec import RunSpec
from mer.runtime.spawned_child import Child
from mer.runtime.stall_watch import ProgressMark, StallWatch, heartbeat_interval_s
from mer.shm.arena import SlotArena
from mer.store.reader import ExpertStore
from mer.metrics.summary import GenerationSummary, JobSummary, PerplexitySummary, RunSummary, ShardSummary

PREFAULT_MIN_BYTES_PER_S = 100e6
SENTINEL_REAP_WAIT_S = 1.0  # longest wait for the exit status of a child whose sentinel fired


StartMessage = StartBenchmark | StartGeneration | StartServing | StartPerplexity | StartShardGroup
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
    if isinstance(job, StartShardGroup):
        return ShardSummary
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
        self.child_restarts = ChildRestarts(config, self.children, self.stall_watch, self._spawn, self.log)
        self.failures = ChildFailures(self.children, self._next_event, self.log)
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
                await shut_down(list(self.children.values()), control, self.config.shutdown_grace_s, self.log)
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
            await self.failures.raise_for(kind, payload)

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
                self.child_restarts.kill_stalled()
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
                self.child_restarts.recovered(self._on_ready(payload))
                continue
            if kind == "ChildStuck":
                self.child_restarts.kill_stuck(payload)
                continue
            if kind == "exited" and self.child_restarts.is_restartable(payload):
                if self.child_restarts.has_restarts_left():
                    await self.child_restarts.restart(payload, self.run_spec, self._control, self._router_name)
                    continue
                await self.failures.raise_for(kind, payload,
                                              f" (after {self.child_restarts.restarts} restarts, max_restarts)")
            await self.failures.raise_for(kind, payload)

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

    # ---- clean-up --------------------------------------------------------------------------------

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


def _child_entry(role: str, index: int | None, name: str, run_json: str) -> None:
    """Spawn target: import the role's module in the child and run it."""
    from workers import entry

    entry.main(role, index, name, run_json)
