"""Experts through the graph: acquire, compute, release. The one path of the benchmark and generation.

`ExpertDispatcher.run_experts(token, batches)` maps expert-major batches keyed by global expert id
(`{expert_id: x [n, d_model]}`) to `{expert_id: out [n, d_model]}`: the experts are leased in the
mapping's order in chunks of at most `max_leases` (one `Acquire` per chunk, so a chunk's leases
always fit, pinned slots aside: `router_lease_limit`); the grants come in parts, the hits at once and each miss as soon as it is read
(`IoClient.acquire_parts`), and each part is computed as it comes, while the next reads go on; a part is computed layer by layer (each layer's format has its own d_ff slices) as one
`ExpertBatchJob` per compute worker, and released (also on error); each expert's slice partials are
summed in slice order, so the outputs are bit-identical for any worker count, cache size, prefetch
setting or read backend, and across a restart of the I/O worker (the experts not yet granted are
acquired again from the new one; those computed are kept). `run(moe_layer, token, batches)` does
the same for one MoE block (ids within the layer, in ascending order). Both return what the experts cost (`ExpertStats`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mer.compute.batches import expert_outputs, pack_batches
from mer.errors import IoWorkerRestartedError
from mer.logging_setup import get_logger
from mer.protocol import ComputeItem, SlotGrant
from mer.router.compute_client import ComputeClient
from mer.router.io_client import IoClient
from mer.compute.slicing import plan_slices
from mer.store.manifest import Manifest
from mer.cache.slot_table import lease_limit
from mer.runtime.ram_budget import pool_slots


def router_lease_limit(config) -> int:
    """`max_leases` for a run's configuration: the arena's slots that no pin can hold
    (`mer.cache.slot_table.lease_limit`), so that every `Acquire` completes."""
    return lease_limit(pool_slots(config), config.max_pinned)


@dataclass
class ExpertStats:
    """What the experts of one or more blocks cost: lookups and microseconds."""

    hits: int = 0
    misses: int = 0
    prefetch_joins: int = 0  # misses that joined a prefetch read already in flight (the rest are demand misses)
    io_wait_us: float = 0.0  # acquires that had a miss, from request to answer
    compute_us: float = 0.0  # the leased experts' batch jobs, from packing to every output summed
    chunks: int = 0

    def add(self, other: "ExpertStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class DispatchLog:
    """When a dispatch's leases were asked for and granted (`time.monotonic`, first request and last
    answer) and the compute jobs it sent (`(job_id, worker)`): the benchmark's `decision_done` event."""

    t_acquire_start: float = 0.0
    t_acquire_end: float = 0.0
    jobs: list[tuple[int, int]] = field(default_factory=list)


class ExpertDispatcher:
    """Runs experts on the graph's slots and compute workers (see the module docstring)."""

    def __init__(self, manifest: Manifest, io: IoClient, compute: ComputeClient, max_leases: int,
                 expert_slices: int):
        self.manifest = manifest
        self.io = io
        self.compute = compute
        self.max_leases = max_leases
        self.slices = [plan_slices(layer.format, expert_slices) for layer in manifest.layers]

    def global_id(self, moe_layer: int, expert: int) -> int:
        return self.manifest.expert_id(moe_layer, expert)

    async def close(self) -> None:
        """Nothing to release: the graph's clients belong to the router (`RemoteDispatcher` closes its links)."""

    async def run(self, moe_layer: int, token: int,
                  batches: Mapping[int, np.ndarray]) -> tuple[dict[int, np.ndarray], ExpertStats]:
        """Each expert's output on its batch (ids within `moe_layer`), and what it cost."""
        ids = {expert: self.global_id(moe_layer, expert) for expert in sorted(batches)}
        outputs, stats = await self.run_experts(token, {ids[expert]: batches[expert] for expert in ids})
        return {expert: outputs[expert_id] for expert, expert_id in ids.items()}, stats

    async def run_experts(self, token: int, batches: Mapping[int, np.ndarray],
                          log: DispatchLog | None = None) -> tuple[dict[int, np.ndarray], ExpertStats]:
        """Each expert's output on its batch (global ids, leased in the mapping's order), and what it cost."""
        experts = list(batches)
        outputs: dict[int, np.ndarray] = {}
        stats = ExpertStats()
        for start in range(0, len(experts), self.max_leases):
            chunk = experts[start : start + self.max_leases]
            outputs.update(await self._run_chunk(token, chunk, batches, stats, log))
        return outputs, stats

    async def _run_chunk(self, token: int, chunk: list[int], batches: Mapping[int, np.ndarray], stats: ExpertStats,
                         log: DispatchLog | None) -> dict[int, np.ndarray]:
        """Lease the chunk and compute each part of the grants as it comes: the hits while the misses load.
        If the I/O worker is restarted meanwhile, the parts granted before are computed to the end and
        kept, and the other experts are acquired again from the new worker (`acquire_retried`)."""
        outputs: dict[int, np.ndarray] = {}
        missing = list(chunk)
        while True:
            try:
                await self._lease_and_compute(token, missing, batches, stats, log, outputs)
                return outputs
            except IoWorkerRestartedError as error:
                missing = [expert for expert in chunk if expert not in outputs]
                get_logger().warning("acquire_retried", token=token, expert_ids=missing, reason=str(error))

    async def _lease_and_compute(self, token: int, experts: list[int], batches: Mapping[int, np.ndarray],
                                 stats: ExpertStats, log: DispatchLog | None, outputs: dict[int, np.ndarray]) -> None:
        """One `Acquire` of `experts`, each part computed as it comes, into `outputs`; released at the end.

        On `IoWorkerRestartedError` the parts already granted are still computed to the end (their
        slots are not written before every lease of the dead worker is released, `IoClient`), so no
        compute job is left reading a slot when its lease is given back; then the error is raised."""
        requested_at = time.monotonic()
        started = time.perf_counter()
        grants: list[SlotGrant] = []
        computing: list[asyncio.Task] = []
        jobs = None if log is None else log.jobs
        try:
            try:
                async for part in self.io.acquire_parts(token, experts):
                    grants += part
                    computing.append(asyncio.ensure_future(self._timed_compute(part, batches, jobs, stats)))
            finally:
                misses = sum(not grant.hit for grant in grants)
                stats.hits += len(grants) - misses
                stats.misses += misses
                stats.prefetch_joins += sum(grant.joined_prefetch for grant in grants)
            if log is not None:
                log.t_acquire_start = log.t_acquire_start or requested_at
                log.t_acquire_end = time.monotonic()
            stats.io_wait_us += (time.perf_counter() - started) * 1e6 if misses else 0.0
            stats.chunks += 1
            for part_outputs in await asyncio.gather(*computing):
                outputs.update(part_outputs)
        except IoWorkerRestartedError:
            for part_outputs in await asyncio.gather(*computing):
                outputs.update(part_outputs)
            raise
        finally:
            for task in computing:  # on an error, no part is still computing on slots about to be released
                if not task.done():
                    task.cancel()
            await asyncio.gather(*computing, return_exceptions=True)
            if grants:
                await self.io.release([grant.ref for grant in grants])

    async def _timed_compute(self, grants: list[SlotGrant], batches: Mapping[int, np.ndarray],
                             jobs: list[tuple[int, int]] | None, stats: ExpertStats) -> dict[int, np.ndarray]:
        started = time.perf_counter()
        outputs = await self._compute(grants, batches, jobs)
        stats.compute_us += (time.perf_counter() - started) * 1e6  # parts may overlap the misses' reads
        return outputs

    async def _compute(self, grants: list[SlotGrant], batches: Mapping[int, np.ndarray],
                       jobs: list[tuple[int, int]] | None) -> dict[int, np.ndarray]:
        """The leased experts' outputs, one layer after another (each layer's format has its own slices)."""
        by_layer: dict[int, list[SlotGrant]] = {}
        for grant in grants:
            by_layer.setdefault(self.manifest.expert(grant.expert_id).moe_layer, []).append(grant)
        outputs: dict[int, np.ndarray] = {}
        for moe_layer in sorted(by_layer):
            layer_grants = by_layer[moe_layer]
            items = [ComputeItem(grant.expert_id, grant.slot, grant.generation, moe_layer) for grant in layer_grants]
            packed = pack_batches(batches, [grant.expert_id for grant in layer_grants])
            partials = await self.compute.compute_batches(items, self.slices[moe_layer], packed, jobs)
            outputs.update(expert_outputs(packed, partials))
        return outputs
