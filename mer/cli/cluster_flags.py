"""The scale-out flags of `generate`, `run` and `serve` (docs/scale-out.md), declared once here.

`--cluster ADDRESS` places one shard group per shard on the nodes of a Ray cluster (`auto`, `local:N`,
`HOST:PORT`, `ray://HOST:PORT`: `mer.cluster.cluster_address`); the other flags shape it and are errors
without it. `cluster_options(args)` checks them into a `ClusterOptions` (None without `--cluster`); a bad
value is a `ConfigError` naming the flag and the value. `mer.cli.cluster_launch` brings the cluster up.
"""

from __future__ import annotations

import argparse
import string
from dataclasses import dataclass
from pathlib import Path

from mer.cli.flag_types import positive_int, positive_number
from mer.cluster.cluster_address import ClusterAddress, parse_cluster_address
from mer.cluster.wire_precision import WIRE_DTYPES
from mer.errors import ConfigError
from mer.router.remote_shards import DEFAULT_SHARD_DEADLINE_S

STORE_DIR_FIELDS = ("shard", "shards")  # the placeholders --store-dir may contain
CLUSTER_FLAGS = ("--cluster", "--shards", "--replicas", "--shard-map", "--shard-deadline-s", "--wire-precision",
                 "--store-dir", "--cluster-keys")


@dataclass(frozen=True)
class ClusterOptions:
    """The checked scale-out flags."""

    address: ClusterAddress
    shards: int | None  # None: one per node (or the shard map's count)
    replicas: int | None  # None: 1 (or the shard map's)
    shard_map: Path | None
    deadline_s: float
    wire_precision: str
    store_dir: str | None  # each node's store path, with {shard} and {shards} filled in; None: made per shard
    keys: Path | None  # None: throw-away keys (local:N only)

    def store_path(self, shard: int, shards: int) -> str | None:
        return None if self.store_dir is None else self.store_dir.format(shard=shard, shards=shards)


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out (docs/scale-out.md)")
    group.add_argument("--cluster", metavar="ADDRESS", default=None,
                       help="Compute the experts on shard groups placed by Ray, one per node: auto (the Ray cluster "
                            "running here), local:N (a throw-away local cluster of N nodes), HOST:PORT (its head) "
                            "or ray://HOST:PORT. Default: this machine only.")
    group.add_argument("--shards", type=positive_int, default=None, metavar="N",
                       help="Shard groups (at most one per node; default: one per node, or the shard map's count).")
    group.add_argument("--replicas", type=positive_int, default=None, metavar="R",
                       help="Shard groups holding each expert (default 1; a replica takes over a shard that does "
                            "not answer within --shard-deadline-s).")
    group.add_argument("--shard-map", type=Path, default=None, metavar="MAP.json",
                       help="The expert -> shard map (e.g. balanced from a trace); default: the uniform map.")
    group.add_argument("--shard-deadline-s", type=positive_number, default=None, metavar="S",
                       help=f"Seconds a shard may take to answer a layer before it fails over (default "
                            f"{DEFAULT_SHARD_DEADLINE_S:g}).")
    group.add_argument("--wire-precision", choices=WIRE_DTYPES, default=None,
                       help="Hidden states and outputs on the wire: f32 (default, tokens bit-identical to one "
                            "machine) or f16 (half the bytes, rounded).")
    group.add_argument("--store-dir", default=None, metavar="PATH",
                       help="Each node's shard store; may contain {shard} and {shards} (e.g. /ssd/store-{shard}of"
                            "{shards}). Default: each shard's store copied from the model's store on this machine.")
    group.add_argument("--cluster-keys", type=Path, default=None, metavar="DIR",
                       help="The CURVE keys of `mer-pipeline keys`, a path every node reads (default for local:N: "
                            "throw-away keys; required otherwise).")


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """The checked scale-out flags, or None without --cluster (then every other cluster flag is an error)."""
    if getattr(args, "cluster", None) is None:  # `up --serve` reuses serve's handler without these flags
        given = [flag for flag in CLUSTER_FLAGS[1:]
                 if getattr(args, flag.removeprefix("--").replace("-", "_"), None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} shape a cluster: give --cluster ADDRESS too")
        return None
    address = parse_cluster_address(args.cluster)
    if args.replicas is not None and args.shards is not None and args.replicas > args.shards:
        raise ConfigError(f"--replicas {args.replicas}: more than --shards {args.shards} (each replica of an "
                          f"expert needs a shard group of its own)")
    if args.cluster_keys is None and address.kind != "local":
        raise ConfigError(f"--cluster {args.cluster}: give --cluster-keys DIR (made by `mer-pipeline keys`, "
                          f"readable at that path on every node); throw-away keys are for local:N only")
    if args.cluster_keys is not None and not args.cluster_keys.is_dir():
        raise ConfigError(f"--cluster-keys {args.cluster_keys}: not a directory (make one with "
                          f"`mer-pipeline keys --out DIR`)")
    if args.shard_map is not None and not args.shard_map.is_file():
        raise ConfigError(f"--shard-map {args.shard_map}: no such file")
    if args.store_dir is not None:
        check_store_dir(args.store_dir)
    deadline_s = DEFAULT_SHARD_DEADLINE_S if args.shard_deadline_s is None else args.shard_deadline_s
    return ClusterOptions(address, args.shards, args.replicas, args.shard_map, deadline_s,
                          args.wire_precision or "f32", args.store_dir, args.cluster_keys)


def check_store_dir(text: str) -> None:
    """--store-dir's placeholders must be {shard} and {shards} only."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as error:
        raise ConfigError(f"--store-dir {text!r}: {error} (use {{shard}} and {{shards}}; {{{{ for a brace)") from None
    unknown = [name for name in fields if name not in STORE_DIR_FIELDS]
    if unknown:
        raise ConfigError(f"--store-dir {text!r}: unknown placeholder {{{unknown[0]}}} (only {{shard}} and "
                          f"{{shards}})")

