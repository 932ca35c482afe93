"""The router: runs the job the start message picks (`mer.router.job`) through the graph once the
supervisor says every child is ready. The serving job (`StartServing`) also takes `SubmitSequence`
and `CancelSequence` on the control socket while it runs; any job takes `IoWorkerRestarted` (the
I/O worker's requests fail over to its replacement: `mer.router.io_client.IoClient`).

Sockets: a DEALER to the I/O worker (`io.sock`), a ROUTER that the compute workers connect to
(`compute.sock`), a PUSH of routing observations to the predictor (`observe.sock`) and a PULL of the
predictor's progress reports (`predictor_progress.sock`; `mer.router.predictor_link`). The job's
summary goes back to the supervisor as `JobDone`; the router then waits for `Shutdown`.
"""

from __future__ import annotations

import asyncio

from mer.errors import ProtocolError
from mer.protocol import (CancelSequence, ChildStuck, IoWorkerRestarted, JobDone, StartBenchmark, StartGeneration,
                          StartPerplexity, StartServing, StartShardGroup, SubmitSequence)
from mer.router.bench_job import BenchJob, progress_printer
from mer.router.compute_client import ComputeClient
from mer.router.io_client import IoClient
from mer.router.predictor_link import PredictorLink
from mer.router.work_deadlines import Overdue
from mer.runtime.paths import process_name
from mer.router.generate_job import GenerateJob
from mer.router.job import Job
from mer.router.perplexity_job import PerplexityJob
from mer.router.serve_job import ServeJob
from mer.router.shard_job import ShardJob
from mer.runtime.cpu_progress import start_limit_s
from mer.store.manifest import Manifest


class Router:
    def __init__(self, context):
        self.context = context
        self.manifest = Manifest.load(context.run.store)
        self.start_job = asyncio.Event()
        self.start_message: (StartBenchmark | StartGeneration | StartServing | StartPerplexity | StartShardGroup
                              | None) = None
        self.job: Job | None = None
        self.io: IoClient | None = None
        self.compute: ComputeClient | None = None
        self.observe: PredictorLink | None = None

    async def start(self) -> dict:
        run, zmq_context = self.context.run, self.context.zmq
        self.compute = ComputeClient(zmq_context, run.endpoint("compute"), run.num_compute_workers,
                                     self.context.config.job_deadline_s)
        self.io = IoClient(zmq_context, run.endpoint("io"), process_name("io", run.run_id),
                           self.context.config.job_deadline_s)
        self.observe = PredictorLink(zmq_context, run.endpoint("observe"), run.endpoint("predictor_progress"),
                                     process_name("predictor", run.run_id), self.context.config.job_deadline_s)
        # bounded by the supervisor's start-up watchdog, which extends slow starts (mer.runtime.cpu_progress)
        await self.compute.wait_connected(start_limit_s(self.context.config.handshake_timeout_s))
        return {"compute_workers": run.num_compute_workers}

    async def on_control(self, message) -> None:
        if isinstance(message, (StartBenchmark, StartGeneration, StartServing, StartPerplexity, StartShardGroup)):
            self.start_message = message
            self.start_job.set()
        elif isinstance(message, IoWorkerRestarted):
            self.io.on_restart(message.name, message.pid)
        elif isinstance(message, (SubmitSequence, CancelSequence)):
            if not isinstance(self.job, ServeJob):
                raise ProtocolError(f"{type(message).__name__} for a router that is not serving")
            await self.job.on_request(message)

    async def serve(self, stop: asyncio.Event) -> None:
        """Wait for the start message, run the job, then wait for Shutdown. A Shutdown that arrives first (the
        supervisor bringing the graph down, e.g. after a child died) cancels the job at once: a job
        waiting on a dead compute worker would otherwise never finish."""
        if not await _first_of(self.start_job, stop):
            return
        job_task = asyncio.create_task(self._run_job())
        stop_task = asyncio.create_task(stop.wait())
        deadlines_task = asyncio.create_task(self._watch_deadlines())
        try:
            await asyncio.wait({job_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            deadlines_task.cancel()
        if not job_task.done():
            job_task.cancel()
            await asyncio.gather(job_task, return_exceptions=True)
            self.context.log.warning("job_cancelled", reason="shutdown before the job finished")
            return
        job_task.result()  # a failed job is reported by the child bootstrap as ChildFailed
        await stop.wait()

    async def _watch_deadlines(self) -> None:
        """Name every compute worker stuck on its jobs, the I/O worker stuck on its acquires, and the predictor
        stuck on its observations to the supervisor, which kills it (`ChildStuck`; `mer.router.work_deadlines`)."""
        deadlines = self.compute.deadlines
        while True:
            await asyncio.sleep(deadlines.interval_s)
            for process, overdue in self.compute.stuck_workers():
                await self._report_stuck(process.name, process.pid, "compute job", overdue)
            for overdue in self.io.stuck():
                await self._report_stuck(self.io.name, self.io.pid, "I/O request", overdue)
            for overdue in self.observe.stuck():
                await self._report_stuck(self.observe.name, self.observe.pid, "observation", overdue)

    async def _report_stuck(self, name: str, pid: int, kind: str, overdue: Overdue) -> None:
        work = f"{kind} {overdue.job_id}" + (f" ({overdue.in_hand} in hand)" if overdue.in_hand > 1 else "")
        self.context.log.error("worker_stuck", child=name, child_pid=pid, work=work, in_hand=overdue.in_hand,
                               silent_s=round(overdue.silent_s, 2), job_deadline_s=self.compute.deadlines.deadline_s)
        await self.context.send_control(ChildStuck(name, pid, work, overdue.silent_s))

    async def _run_job(self) -> None:
        self.job = self._job()
        try:
            summary = await self.job.run()
        finally:
            await self.job.close()
        await self.context.send_control(JobDone(summary.to_json_dict()))

    def _job(self) -> Job:
        """The job the start message asks for."""
        context = self.context
        common = (context.config, self.manifest, self.io, self.compute, self.observe, context.log)
        if isinstance(self.start_message, StartGeneration):
            return GenerateJob(self.start_message, *common, context.send_control)
        if isinstance(self.start_message, StartServing):
            return ServeJob(self.start_message, *common, context.send_control)
        if isinstance(self.start_message, StartPerplexity):
            return PerplexityJob(self.start_message, *common, context.send_control)
        if isinstance(self.start_message, StartShardGroup):
            return ShardJob(self.start_message, *common, context.send_control)
        return BenchJob(*common, progress=progress_printer(context.config.tokens),
                        start=self.start_message or StartBenchmark())

    def close(self) -> None:
        for client in (self.io, self.compute, self.observe):
            if client is not None:
                client.close()


async def _first_of(wanted: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait until `wanted` or `stop` is set; True if `wanted` was set first (and `stop` is not set)."""
    tasks = {asyncio.create_task(wanted.wait()), asyncio.create_task(stop.wait())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    return wanted.is_set() and not stop.is_set()
