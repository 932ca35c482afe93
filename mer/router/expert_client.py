"""The experts of one MoE block of a real model, through the graph: acquire, compute, release.

`ExpertDispatcher.run(moe_layer, token, batches)` takes one block's expert-major batches
(`{expert: x [n, d_model]}`, ids within the layer) and returns `{expert: out [n, d_model]}`, as an
`ExpertFn` does in one process (`mer.model.experts`):

1. the experts are taken in ascending order, in chunks of at most `cache_slots` (a long prompt may
   route to more experts of a layer than the cache holds; a chunk's leases always fit);
2. each chunk's experts are leased from the I/O worker (global id = moe_layer x experts_per_layer +
   expert), read on a miss, and computed as one `ExpertBatchJob` per compute worker, each expert on
   its own rows; every expert is computed once per block, whatever its number of tokens;
3. the leases are released (also on error), and each expert's slice partials are summed in slice
   order (`mer.expert_batches`), so the outputs are bit-identical for any worker count, cache size,
   prefetch setting or read backend.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mer.expert_batches import PackedBatches, expert_outputs, pack_batches
from mer.protocol import ComputeItem, ExpertBatchJob, ExpertBatchResult, SliceRange, encode
from mer.router.clients import ComputeClient, IoClient
from mer.slicing import plan_slices, slices_of_worker
from mer.store.manifest import Manifest


@dataclass
class ExpertStats:
    """What the experts of one or more blocks cost: lookups and microseconds."""

    hits: int = 0
    misses: int = 0
    prefetch_joins: int = 0  # misses that joined a prefetch read already in flight (the rest are demand misses)
    io_wait_us: float = 0.0  # acquires that had a miss, from request to answer
    compute_us: float = 0.0  # batch jobs sent until every partial is back
    chunks: int = 0

    def add(self, other: "ExpertStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


async def compute_expert_batches(client: ComputeClient, items: list[ComputeItem], slices: list[SliceRange],
                                 packed: PackedBatches) -> np.ndarray:
    """Partials `[slices, rows, d_model]` of the packed batches; slice s computed by worker s % N."""
    partials = np.empty((len(slices), *packed.x.shape), dtype=np.float32)
    waits = []
    for worker in range(client.num_workers):
        mine = slices_of_worker(len(slices), worker, client.num_workers)
        if not mine:
            continue
        job_id, future = client.pending.new()
        job = ExpertBatchJob(job_id, items, [slices[s] for s in mine], packed.x, list(packed.row_offsets))
        await client.socket.send_multipart([client.identities[worker], *encode(job)], copy=False)
        waits.append((mine, future))
    for mine, future in waits:
        result: ExpertBatchResult = await future
        partials[mine] = result.partials
    return partials


class ExpertDispatcher:
    """Runs MoE blocks' experts on the graph's slots and compute workers (see the module docstring)."""

    def __init__(self, manifest: Manifest, io: IoClient, compute: ComputeClient, max_leases: int):
        self.manifest = manifest
        self.io = io
        self.compute = compute
        self.max_leases = max_leases
        self.slices = [plan_slices(layer.format) for layer in manifest.layers]

    def global_id(self, moe_layer: int, expert: int) -> int:
        return self.manifest.expert_id(moe_layer, expert)

    async def run(self, moe_layer: int, token: int,
                  batches: Mapping[int, np.ndarray]) -> tuple[dict[int, np.ndarray], ExpertStats]:
        """Each expert's output on its batch, and what it cost."""
        experts = sorted(batches)
        outputs: dict[int, np.ndarray] = {}
        stats = ExpertStats()
        for start in range(0, len(experts), self.max_leases):
            chunk = experts[start : start + self.max_leases]
            outputs.update(await self._run_chunk(moe_layer, token, pack_batches(batches, chunk), stats))
        return outputs, stats

    async def _run_chunk(self, moe_layer: int, token: int, packed: PackedBatches,
                         stats: ExpertStats) -> dict[int, np.ndarray]:
        expert_ids = [self.global_id(moe_layer, expert) for expert in packed.experts]
        started = time.perf_counter()
        grants = await self.io.acquire(token, expert_ids)
        acquire_us = (time.perf_counter() - started) * 1e6
        misses = sum(not grant.hit for grant in grants)
        stats.hits += len(grants) - misses
        stats.misses += misses
        stats.prefetch_joins += sum(grant.joined_prefetch for grant in grants)
        stats.io_wait_us += acquire_us if misses else 0.0
        stats.chunks += 1
        try:
            items = [ComputeItem(grant.expert_id, grant.slot, grant.generation, moe_layer) for grant in grants]
            started = time.perf_counter()
            partials = await compute_expert_batches(self.compute, items, self.slices[moe_layer], packed)
            stats.compute_us += (time.perf_counter() - started) * 1e6
        finally:
            await self.io.release([grant.ref for grant in grants])
        return expert_outputs(packed, partials)
