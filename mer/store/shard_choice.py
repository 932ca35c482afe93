"""Which experts a shard store holds: `--shard i/N` and an optional `--shard-map MAP.json`.

`parse_shard(text)` reads `i/N` (0 <= i < N, N >= 1). `shard_info(geometry, index, count, map_path)`
takes the map from the file (checked against the model: `layers`, `experts_per_layer` and
`num_shards` must match) or, without one, the uniform map of `mer.cluster.shard_balance` for N
shards, and gives the manifest's `ShardInfo`: the shard, the map's hash and `experts_of(i)`.
"""

from __future__ import annotations

import os
import re

from mer.cluster.shard_balance import uniform_map
from mer.cluster.shard_map import ShardMap, read_shard_map, shard_map_hash
from mer.errors import ConfigError, ShardMapError
from mer.store.manifest import Geometry, ShardInfo

_SHARD = re.compile(r"(\d+)/(\d+)")


def parse_shard(text: str) -> tuple[int, int]:
    """(index, count) of `--shard i/N`; ConfigError naming the value unless 0 <= i < N and N >= 1."""
    match = _SHARD.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"--shard {text!r} is not of the form i/N (shard i of N, counted from 0)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text!r}: the shard count N is {count}, it must be at least 1")
    if index >= count:
        raise ConfigError(f"--shard {text!r}: the shard index i is {index}, it must be in 0..{count - 1}")
    return index, count


def check_map_fits(shard_map: ShardMap, geometry: Geometry, count: int) -> None:
    """ShardMapError naming the map and the field unless the map is for this model and N shards."""
    where = shard_map.source
    fields = (("layers", shard_map.layers, geometry.num_moe_layers, "MoE layers"),
              ("experts_per_layer", shard_map.experts_per_layer, geometry.experts_per_layer, "experts per layer"),
              ("num_shards", shard_map.num_shards, count, "shards (--shard i/N)"))
    for name, value, expected, what in fields:
        if value != expected:
            raise ShardMapError(f"{where}: field {name!r} is {value}, but the model has {expected} {what}"
                                if name != "num_shards" else
                                f"{where}: field 'num_shards' is {value}, but --shard asks for one of {expected}")


def shard_info(geometry: Geometry, index: int, count: int, map_path: str | os.PathLike | None = None) -> ShardInfo:
    """The `ShardInfo` of shard `index` of `count` (see the module docstring)."""
    if map_path is None:
        shard_map = uniform_map(geometry.num_moe_layers, geometry.experts_per_layer, count)
    else:
        shard_map = read_shard_map(map_path)
        check_map_fits(shard_map, geometry, count)
    experts = tuple(shard_map.experts_of(index))
    if not experts:
        raise ConfigError(f"--shard {index}/{count}: the shard map ({shard_map.source}) places no expert on shard "
                          f"{index}: there is no store to write")
    return ShardInfo(index, count, shard_map_hash(shard_map), shard_map.replicas, experts)
