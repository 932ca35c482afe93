"""Building expert -> shard maps (`mer.cluster.shard_map.ShardMap`): balanced by measured expert frequency,
or uniform when there is no trace.

`balanced_map(frequencies, ...)` is greedy, layer by layer: within a layer the experts go from the most
frequent to the least (ties: the lower id first), and each expert's `replicas` copies go to the
shards that are least loaded, ranked by (this layer's load, the total load, the number of experts
held, the shard id), each copy adding `frequency / replicas` to its shard. The layer's load comes
first because a token waits for the slowest shard of each layer (one request per layer per shard);
the total load (bytes read per token) and the count of experts (store size, RAM) break ties, and
the shard id makes the map deterministic. `uniform_map` places expert `e`'s copies on shards
`(e + r) % num_shards`, r = 0..replicas-1.

`expert_frequencies(trace)` counts how often each expert was chosen in a routing trace
(`mer.routing.trace`), indexed by global id `layer * experts_per_layer + expert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mer.cluster.shard_map import ShardMap
from mer.errors import ShardMapError
from mer.routing.trace import TraceHeader, read_trace


def expert_frequencies(trace_path: str | Path) -> tuple[TraceHeader, np.ndarray]:
    """The trace's header and each expert's count of selections (int64, `layers * experts_per_layer`)."""
    header, decisions = read_trace(trace_path)
    counts = np.zeros(header.layers * header.experts_per_layer, dtype=np.int64)
    for decision in decisions:
        for expert in decision.experts:
            counts[decision.layer * header.experts_per_layer + expert] += 1
    return header, counts


def uniform_map(layers: int, experts_per_layer: int, num_shards: int, replicas: int = 1) -> ShardMap:
    """Expert `e` on shards `(e + r) % num_shards` for r < replicas (round robin by global id)."""
    _check_counts(num_shards, replicas)
    placements = tuple(tuple((expert + copy) % num_shards for copy in range(replicas))
                       for expert in range(layers * experts_per_layer))
    return ShardMap(num_shards, replicas, layers, experts_per_layer, placements)


def balanced_map(frequencies: Sequence[float], layers: int, experts_per_layer: int, num_shards: int,
                 replicas: int = 1) -> ShardMap:
    """The greedy map of the module docstring for per-expert `frequencies` (global ids)."""
    _check_counts(num_shards, replicas)
    frequencies = [float(value) for value in frequencies]
    if len(frequencies) != layers * experts_per_layer:
        raise ShardMapError(f"{len(frequencies)} expert frequencies, the model has {layers * experts_per_layer} "
                            f"experts ({layers} layers x {experts_per_layer})")
    bad = [(expert, value) for expert, value in enumerate(frequencies) if not value >= 0.0 or value == float("inf")]
    if bad:
        raise ShardMapError(f"expert frequency {bad[0][1]!r} of expert {bad[0][0]} is not a finite number >= 0")
    total_load = [0.0] * num_shards
    held = [0] * num_shards
    placements: list[tuple[int, ...]] = [()] * len(frequencies)
    for layer in range(layers):
        layer_load = [0.0] * num_shards
        first = layer * experts_per_layer
        experts = sorted(range(first, first + experts_per_layer), key=lambda expert: (-frequencies[expert], expert))
        for expert in experts:
            ranked = sorted(range(num_shards), key=lambda shard: (layer_load[shard], total_load[shard], held[shard], shard))
            chosen = tuple(ranked[:replicas])
            for shard in chosen:
                share = frequencies[expert] / replicas
                layer_load[shard] += share
                total_load[shard] += share
                held[shard] += 1
            placements[expert] = chosen
    return ShardMap(num_shards, replicas, layers, experts_per_layer, tuple(placements))


def map_from_trace(trace_path: str | Path, num_shards: int, replicas: int = 1) -> ShardMap:
    """The balanced map for the expert frequencies of a routing trace."""
    header, counts = expert_frequencies(trace_path)
    return balanced_map(counts, header.layers, header.experts_per_layer, num_shards, replicas)


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of per-shard loads (1.0 is perfect balance)."""
    mean = sum(loads) / len(loads)
    if mean <= 0.0:
        raise ShardMapError("imbalance of loads that are all zero")
    return max(loads) / mean


def _check_counts(num_shards: int, replicas: int) -> None:
    if num_shards < 1 or replicas < 1:
        raise ShardMapError(f"num_shards {num_shards} and replicas {replicas} must be positive")
    if replicas > num_shards:
        raise ShardMapError(f"replicas {replicas} is more than the {num_shards} shards (each replica needs its own shard)")
