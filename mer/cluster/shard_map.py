"""The expert -> shard map of a cluster: on which shard groups each expert lives, and which replica serves it.

Experts are named by their global store id, `moe_layer * experts_per_layer + expert` (as
`mer.store.manifest.Manifest.expert_id` and a flat-pool routing trace name them). Each expert lives on
`replicas` distinct shards (`placements[expert]`, its first entry the primary); `experts_of(shard)`
lists a shard's experts (what its store holds). `choose_replica(expert, queue_lengths)` picks the
replica with the shortest queue, ties to the lowest shard id. `mer.cluster.shard_balance` builds maps
(balanced by a trace's expert frequencies, or uniform).

JSON (version 1): `{"mer_shard_map": 1, "num_shards": N, "replicas": R, "layers": L,
"experts_per_layer": E, "placements": [[shard, ...], ...]}`, one list of R distinct shard ids per
global expert id, L * E lists. Reading checks every field and names the file and the field at fault.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mer.errors import ShardMapError

SHARD_MAP_VERSION = 1


@dataclass(frozen=True)
class ShardMap:
    """Where each expert lives (see the module docstring); checked when built."""

    num_shards: int
    replicas: int
    layers: int
    experts_per_layer: int
    placements: tuple[tuple[int, ...], ...]
    source: str = field(default="shard map", compare=False, repr=False)  # what errors name (its file)

    def __post_init__(self) -> None:
        check_shard_map_fields(self, self.source)

    @property
    def num_experts(self) -> int:
        return self.layers * self.experts_per_layer

    def shards_of(self, expert: int) -> tuple[int, ...]:
        """The shards holding `expert` (global id), primary first."""
        if not 0 <= expert < self.num_experts:
            raise ShardMapError(f"expert {expert} is not in the shard map's 0..{self.num_experts - 1}")
        return self.placements[expert]

    def experts_of(self, shard: int) -> list[int]:
        """The global ids of the experts shard `shard` holds, ascending."""
        if not 0 <= shard < self.num_shards:
            raise ShardMapError(f"shard {shard} is not in the shard map's 0..{self.num_shards - 1}")
        return [expert for expert, shards in enumerate(self.placements) if shard in shards]

    def choose_replica(self, expert: int, queue_lengths: Sequence[int]) -> int:
        """The shard of `expert` with the shortest queue (`queue_lengths[shard]`: requests in flight); ties
        go to the lowest shard id."""
        if len(queue_lengths) != self.num_shards:
            raise ShardMapError(f"queue_lengths has {len(queue_lengths)} entries, the map has {self.num_shards} shards")
        return min(self.shards_of(expert), key=lambda shard: (queue_lengths[shard], shard))

    def shard_loads(self, frequencies: Sequence[float]) -> list[float]:
        """Each shard's expected share of expert work if every expert's frequency is split evenly over its
        replicas (what the balance minimises the largest of)."""
        if len(frequencies) != self.num_experts:
            raise ShardMapError(f"{len(frequencies)} frequencies for a map of {self.num_experts} experts")
        loads = [0.0] * self.num_shards
        for expert, shards in enumerate(self.placements):
            for shard in shards:
                loads[shard] += frequencies[expert] / len(shards)
        return loads

    def to_json_dict(self) -> dict:
        return {"mer_shard_map": SHARD_MAP_VERSION, "num_shards": self.num_shards, "replicas": self.replicas,
                "layers": self.layers, "experts_per_layer": self.experts_per_layer,
                "placements": [list(shards) for shards in self.placements]}

    @classmethod
    def from_json_dict(cls, data: object, where: str = "shard map") -> "ShardMap":
        if not isinstance(data, dict):
            raise ShardMapError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("mer_shard_map") != SHARD_MAP_VERSION:
            raise ShardMapError(f"{where}: field 'mer_shard_map' is {data.get('mer_shard_map')!r}, this mer reads "
                                f"version {SHARD_MAP_VERSION}")
        names = ("num_shards", "replicas", "layers", "experts_per_layer", "placements")
        missing = [name for name in names if name not in data]
        if missing:
            raise ShardMapError(f"{where}: missing field(s) {', '.join(missing)}")
        placements = data["placements"]
        if not isinstance(placements, list) or not all(isinstance(shards, list) for shards in placements):
            raise ShardMapError(f"{where}: field 'placements' must be a list of lists of shard ids")
        values = {name: data[name] for name in names[:-1]}
        return cls(**values, placements=tuple(tuple(shards) for shards in placements), source=where)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_shard_map_fields(shard_map: ShardMap, where: str) -> None:
    """Raise ShardMapError naming the first bad field: counts, shards >= replicas, every expert placed on
    `replicas` distinct shards in range."""
    for name in ("num_shards", "replicas", "layers", "experts_per_layer"):
        if not _is_count(getattr(shard_map, name)):
            raise ShardMapError(f"{where}: field {name!r} must be a positive integer, got {getattr(shard_map, name)!r}")
    if shard_map.replicas > shard_map.num_shards:
        raise ShardMapError(f"{where}: field 'replicas' is {shard_map.replicas}, more than the {shard_map.num_shards} "
                            f"shards (each replica needs its own shard)")
    if len(shard_map.placements) != shard_map.num_experts:
        raise ShardMapError(f"{where}: field 'placements' has {len(shard_map.placements)} entries, the model has "
                            f"{shard_map.num_experts} experts ({shard_map.layers} layers x {shard_map.experts_per_layer}): "
                            f"every expert must be placed")
    for expert, shards in enumerate(shard_map.placements):
        name = f"placements[{expert}]"
        if len(shards) != shard_map.replicas:
            raise ShardMapError(f"{where}: field {name} has {len(shards)} shards, expected replicas = {shard_map.replicas}")
        for shard in shards:
            if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shard_map.num_shards:
                raise ShardMapError(f"{where}: field {name}: shard {shard!r} is not in 0..{shard_map.num_shards - 1}")
        if len(set(shards)) != len(shards):
            raise ShardMapError(f"{where}: field {name}: replicas {list(shards)} are not on distinct shards")


def shard_map_hash(shard_map: ShardMap) -> str:
    """The map's identity: hex SHA-256 of its JSON with sorted keys and no spaces (what a shard store's
    manifest records as `shard.map_hash`; equal maps give equal hashes, whatever file they came from)."""
    text = json.dumps(shard_map.to_json_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_shard_map(path: str | Path, shard_map: ShardMap) -> None:
    try:
        Path(path).write_text(json.dumps(shard_map.to_json_dict(), separators=(",", ":")) + "\n")
    except OSError as error:
        raise ShardMapError(f"{path}: cannot write the shard map ({error.strerror or error})") from None


def read_shard_map(path: str | Path) -> ShardMap:
    """A shard map from its JSON file, fully checked (errors name the file and the field)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ShardMapError(f"{path}: cannot read the shard map ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ShardMapError(f"{path}: the shard map is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ShardMapError(f"{path}: the shard map is not JSON ({error})") from None
    return ShardMap.from_json_dict(data, str(path))
