"""The experts of a job on remote shard groups (`--cluster`, docs/scale-out.md): the dispatcher the router
uses instead of `ExpertDispatcher` when the start message carries `remote_shards`.

It has the local dispatcher's interface (`global_id`, `run(moe_layer, token, batches)`,
`run_experts(token, batches, log)`), so the forward pass (`mer.router.graph_forward.GraphExperts`) and the
benchmark combine its outputs with the gate weights exactly as they combine the local ones: each expert's
output is computed on its shard by that graph's `ExpertDispatcher` (d_ff slices summed in slice order) and
travels as f32 raw frames, so the tokens are bit-identical to one machine's (`f16` on the wire trades that
for half the bytes). One `ShardLayerRequest` per shard with work per MoE layer (`RemoteShards`: shortest-
queue replica, deadline, failover, `ShardUnavailableError` naming the shard and the experts).

`close()` logs one `shard_link_summary` per shard (requests, rows, bytes, round trips, failovers) and
closes the links. The experts' costs it reports (`ExpertStats`) are the round trips as `compute_us`; hits and
misses happen on the shards and are not counted here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from mer.cluster.shard_map import ShardMap
from mer.errors import ConfigError
from mer.protocol import RemoteShardsSpec, ShardLinkCounts
from mer.router.dispatcher import DispatchLog, ExpertDispatcher, ExpertStats, router_lease_limit
from mer.router.remote_shards import RemoteShards
from mer.store.manifest import Manifest


def shard_map_of(spec: RemoteShardsSpec) -> ShardMap:
    return ShardMap(len(spec.endpoints), spec.replicas, spec.layers, spec.experts_per_layer,
                    tuple(tuple(shards) for shards in spec.placements), source="the start message's remote_shards")


class RemoteDispatcher:
    """Runs a job's experts on remote shard groups (see the module docstring)."""

    def __init__(self, manifest: Manifest, shards: RemoteShards, log):
        self.manifest = manifest
        self.shards = shards
        self.log = log

    @classmethod
    def connect(cls, manifest: Manifest, spec: RemoteShardsSpec, log) -> "RemoteDispatcher":
        shard_map = shard_map_of(spec)
        geometry = manifest.geometry
        if (shard_map.layers, shard_map.experts_per_layer) != (geometry.num_moe_layers, geometry.experts_per_layer):
            raise ConfigError(f"the shard map has {shard_map.layers} layers x {shard_map.experts_per_layer} experts, "
                              f"the store {geometry.num_moe_layers} x {geometry.experts_per_layer}")
        shards = RemoteShards.connect(shard_map, spec.endpoints, spec.key_dir, deadline_s=spec.deadline_s,
                                      wire_dtype=spec.wire_precision, log=log)
        log.info("remote_shards_connected", endpoints=list(spec.endpoints), replicas=spec.replicas,
                 deadline_s=spec.deadline_s, wire_precision=spec.wire_precision)
        return cls(manifest, shards, log)

    def global_id(self, moe_layer: int, expert: int) -> int:
        return self.manifest.expert_id(moe_layer, expert)

    async def run(self, moe_layer: int, token: int,
                  batches: Mapping[int, np.ndarray]) -> tuple[dict[int, np.ndarray], ExpertStats]:
        """Each expert's output on its batch (ids within `moe_layer`), and the round trip as its cost."""
        started = time.perf_counter()
        outputs = await self.shards.run_layer(moe_layer, batches, token)
        return outputs, ExpertStats(compute_us=(time.perf_counter() - started) * 1e6, chunks=1)

    async def run_experts(self, token: int, batches: Mapping[int, np.ndarray],
                          log: DispatchLog | None = None) -> tuple[dict[int, np.ndarray], ExpertStats]:
        """Each expert's output on its batch (global ids), one MoE layer after another."""
        by_layer: dict[int, dict[int, np.ndarray]] = {}
        for expert_id, rows in batches.items():
            expert = self.manifest.expert(expert_id)
            by_layer.setdefault(expert.moe_layer, {})[expert_id - self.global_id(expert.moe_layer, 0)] = rows
        outputs: dict[int, np.ndarray] = {}
        stats = ExpertStats()
        if log is not None:
            log.t_acquire_start = log.t_acquire_start or time.monotonic()
        for moe_layer in sorted(by_layer):
            layer_outputs, layer_stats = await self.run(moe_layer, token, by_layer[moe_layer])
            stats.add(layer_stats)
            outputs.update({self.global_id(moe_layer, expert): out for expert, out in layer_outputs.items()})
        if log is not None:
            log.t_acquire_end = time.monotonic()
        return {expert_id: outputs[expert_id] for expert_id in batches}, stats

    def shard_link_counts(self) -> list[ShardLinkCounts]:
        """Each shard's counters so far (`serve --cluster` sends them in every `ServeStep`)."""
        return [ShardLinkCounts(stats.shard, stats.requests, stats.rows, stats.bytes_sent, stats.bytes_received,
                                stats.round_trip_us_total, stats.failovers, stats.errors, stats.down)
                for stats in self.shards.stats]

    def link_summaries(self) -> list[dict]:
        return [stats.to_event_fields() for stats in self.shards.stats]

    async def close(self) -> None:
        for fields in self.link_summaries():
            self.log.info("shard_link_summary", **fields)
        await self.shards.close()


def job_dispatcher(start, manifest: Manifest, io, compute, config, log) -> ExpertDispatcher | RemoteDispatcher:
    """The dispatcher a job's start message asks for: the shard groups of `start.remote_shards`, else the graph's."""
    spec = getattr(start, "remote_shards", None)
    if spec is not None:
        return RemoteDispatcher.connect(manifest, spec, log)
    return ExpertDispatcher(manifest, io, compute, max_leases=router_lease_limit(config),
                            expert_slices=config.expert_slices)
