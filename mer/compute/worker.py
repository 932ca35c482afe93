"""A compute worker: SwiGLU on d_ff slices of experts held in the slot arena (mapped read-only).

Jobs arrive on `compute.sock` (a DEALER with identity `compute-<i>`, connected to the router's
ROUTER), one kind for every job: an `ExpertBatchJob` (a model's MoE block, or the benchmark's one
row per expert), of which the worker computes each item's assigned d_ff slices on the item's own
rows of x (`mer.compute.batches.item_partials`, rounding the kernels' inputs as llama.cpp does;
it changes only f16/bf16 matrices) and answers the partials `[slices, rows, d_model]`. For every
item the worker checks the slot header's generation and expert id before and after computing, so
a slot reassigned under it is refused (`StaleSlotError`) instead of computed. Kernels run with a
fixed thread count (`kernel_threads`); workers x threads <= cores.

While a job runs (the event loop is busy with it) the worker reports its progress between items and
between chunks of an item's rows (`PROGRESS_CHUNK_ROWS`, `mer.compute.batches.item_partials_in_chunks`:
the same bits as one call), at most every `heartbeat_interval_s(job_deadline_s)` (`JobProgress`, sent
at once without waiting): the router's per-worker deadline (`mer.router.work_deadlines`) tells such
long work, even one expert on the rows of a large prefill batch, from a worker stuck in a busy loop.
`MER_WORK_FAULTS` injects such a loop, or slow items or rows, for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import numba
import numpy as np
import zmq

from mer.compute.expert_format import ExpertPayload
from mer.environment import WorkFaults, read_environment
from mer.errors import NonFiniteError
from mer.runtime.child import receive_unless_stopped
from mer.runtime.fault_loops import busy_for, spin_forever
from mer.compute.batches import item_partials_in_chunks
from mer.protocol import (UNKNOWN_REQUEST_ID, ExpertBatchJob, ExpertBatchResult, Hello, JobProgress, decode, encode,
                          error_reply)
from mer.runtime.stall_watch import heartbeat_interval_s
from mer.shm.arena import SlotArena
from mer.store.manifest import Manifest
from mer.quant.vector_ir import fastest_kernel
from mer.compute.swiglu import swiglu_expert


class ComputeWorker:
    def __init__(self, context):
        self.context = context
        self.index: int = context.index
        self.manifest = Manifest.load(context.run.store)
        self.arena: SlotArena | None = None
        self.socket = None
        self.last_job: dict | None = None  # timing of the last job done, logged after its reply is sent
        self.progress_socket: zmq.Socket | None = None  # the job socket, for JobProgress sent mid-job (`start`)
        self.progress_interval_s = 0.0
        self.faults = read_environment().work_faults or WorkFaults()
        self.jobs_started = 0
        self._reported_at = 0.0  # time.monotonic() of the running job's start or last JobProgress
        self.last_item_rows = 0  # the most rows of one item in the running job (logged with it)

    async def start(self) -> dict:
        threads = self.context.config.kernel_threads
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.arena = SlotArena.attach(self.context.run.arena_path, writable=False)
        compile_seconds = self._warm_up_kernels()
        self.socket = self.context.zmq.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, f"compute-{self.index}".encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.context.run.endpoint("compute"))
        self.progress_socket = zmq.Socket.shadow(self.socket.underlying)  # synchronous sends from inside a job
        self.progress_interval_s = heartbeat_interval_s(self.context.config.job_deadline_s)
        await self.socket.send_multipart(encode(Hello(self.context.name, os.getpid())))
        return {"kernel": fastest_kernel(), "kernel_threads": threads, "warm_up_s": round(compile_seconds, 3)}

    def _warm_up_kernels(self) -> float:
        """Compile (or load from numba's cache) the kernels of every layer format before Ready."""
        started = time.perf_counter()
        seen = set()
        for layer in self.manifest.layers:
            key = tuple((m.dtype, m.layout) for m in layer.format.matrices)
            if key in seen:
                continue
            seen.add(key)
            data = np.zeros(layer.format.payload_nbytes, dtype=np.uint8)
            data.setflags(write=False)  # slots are mapped read-only: compile that specialisation
            payload = ExpertPayload(layer.format, data)
            x = np.zeros((1, layer.format.d_model), dtype=np.float32)
            swiglu_expert(payload, x, slice(0, layer.format.slice_quantum), threads=self.context.config.kernel_threads)
        return time.perf_counter() - started

    async def serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            frames = await receive_unless_stopped(self.socket, stop)
            if frames is None:
                break
            reply = self._handle(frames)
            await self.socket.send_multipart(encode(reply), copy=False)
            if self.last_job is not None:
                self.context.log.info("compute_job", **self.last_job)
                self.last_job = None

    def _handle(self, frames):
        job_id = UNKNOWN_REQUEST_ID
        try:
            job = decode(frames, expected_kinds=(ExpertBatchJob,))
            job_id = job.job_id
            t_start = time.monotonic()
            started = time.perf_counter()
            self.last_item_rows = 0
            partials = self.compute(job)
            compute_us = (time.perf_counter() - started) * 1e6
            self.last_job = {"job_id": job_id, "expert_ids": [item.expert_id for item in job.items],
                             "slices": len(job.slices), "max_item_rows": self.last_item_rows, "t_start": t_start,
                             "t_end": time.monotonic(),
                             "compute_us": compute_us}
            return ExpertBatchResult(job_id, self.index, partials, compute_us)
        except Exception as error:  # a bad job is answered, never fatal
            self.context.log.warning("compute_job_failed", job_id=job_id, error=str(error))
            return error_reply(job_id, error)

    def compute(self, job: ExpertBatchJob) -> np.ndarray:
        """Partials `[slices, rows, d_model]`: each item's slices on its own rows of x, its slot checked
        before and after."""
        x = np.array(job.x, dtype=np.float32)  # a writable copy of the received frame
        partials = np.empty((len(job.slices), x.shape[0], x.shape[1]), dtype=np.float32)
        self.jobs_started += 1
        if self.faults.spin is not None and self.faults.spins_in(str(self.index), self.jobs_started,
                                                                  self.context.run.incarnation):
            spin_forever(self.context.log, job_id=job.job_id)
        self._reported_at = time.monotonic()
        for item_index, item in enumerate(job.items):
            self._progress(job.job_id, item_index)
            if self.faults.slow_item_s:
                busy_for(self.faults.slow_item_s)
            layer = self.manifest.layers[item.moe_layer]
            self.arena.check_slot(item.slot, item.generation, item.expert_id)
            payload = ExpertPayload(layer.format, self.arena.slot_array(item.slot)[: layer.format.payload_nbytes])
            rows = slice(job.row_offsets[item_index], job.row_offsets[item_index + 1])
            self.last_item_rows = max(self.last_item_rows, rows.stop - rows.start)

            def before_chunk(chunk_rows: int, items_done: int = item_index) -> None:
                self._progress(job.job_id, items_done)
                if self.faults.slow_row_s:
                    busy_for(self.faults.slow_row_s * chunk_rows)

            with np.errstate(invalid="ignore", over="ignore"):  # NaN or inf is reported below, not warned of
                item_partials_in_chunks(payload, x[rows], job.slices, self.context.config.kernel_threads,
                                        partials[:, rows], before_chunk)
            self.arena.check_slot(item.slot, item.generation, item.expert_id)
            if not np.isfinite(partials[:, rows]).all():
                raise NonFiniteError(self._non_finite_message(item.expert_id))
        return partials

    def _progress(self, job_id: int, items_done: int) -> None:
        """Between items and between chunks of an item's rows: `JobProgress` if `progress_interval_s` has
        passed since the last one (or since the job began)."""
        if self.progress_socket is not None and time.monotonic() - self._reported_at >= self.progress_interval_s:
            self._report_progress(job_id, items_done)
            self._reported_at = time.monotonic()

    def _report_progress(self, job_id: int, items_done: int) -> None:
        """`JobProgress` to the router now; dropped if it cannot go at once (the router is not reading):
        the next one says the same."""
        with contextlib.suppress(zmq.Again):
            self.progress_socket.send_multipart(encode(JobProgress(job_id, self.index, items_done)), flags=zmq.NOBLOCK)

    def _non_finite_message(self, expert_id: int) -> str:
        entry = self.manifest.expert(expert_id)
        path = Path(self.context.run.store) / self.manifest.layers[entry.moe_layer].file
        return (f"{self.manifest.describe(expert_id)}: its output holds NaN or inf (its payload in {path} at offset "
                f"{entry.offset} has a NaN or inf weight or block scale, or its input is out of range)")

    async def on_control(self, message) -> None:
        pass

    def close(self) -> None:
        self.progress_socket = None  # a shadow of the job socket: closing it would close that one
        if self.socket is not None:
            self.socket.close(linger=0)
        if self.arena is not None:
            self.arena.close()

