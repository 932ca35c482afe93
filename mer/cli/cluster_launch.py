"""Bringing a command's shard groups up and down (`--cluster`, docs/scale-out.md).

`shard_groups(options, store_dir, config)` is a context manager: it brings the Ray cluster up or joins it
(`mer.cluster.ray_cluster`: one `ShardNode` actor per node), chooses the shard map (`--shard-map`, else the
uniform map of `--shards` shards, one per node by default, with `--replicas`), finds each shard's store
(`--store-dir`, else a shard store copied from the model's store into the cache, reused while it matches),
starts shard group i on node i through its actor (`start_shard_group`: `shard-serve` over that store, the
graph flags of this command's configuration) and yields the `RemoteShardsSpec` the job's start message
carries. However the block is left (an error, a signal, a failed start), the groups are stopped, the actors
killed, a local cluster shut down and its processes reaped, and throw-away keys removed.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mer.cli.cluster_flags import ClusterOptions
from mer.cluster.keys import write_key_files
from mer.cluster.ray_cluster import RayCluster, ray_cluster
from mer.cluster.shard_balance import uniform_map
from mer.cluster.shard_group_launch import ShardGroupEndpoint, ShardGroupSpec
from mer.cluster.shard_map import ShardMap, read_shard_map, shard_map_hash, write_shard_map
from mer.config import PipelineConfig
from mer.environment import read_environment
from mer.errors import ConfigError, MerError
from mer.logging_setup import get_logger
from mer.protocol import RemoteShardsSpec
from mer.store.manifest import Geometry, Manifest
from mer.store.shard_choice import check_map_fits
from mer.store.shard_copy import copy_shard

# the configuration keys a shard group's graph takes from the command's (so that its experts compute as here)
FORWARDED_KEYS = ("compute_workers", "kernel_threads", "expert_slices", "io_backend", "handshake_timeout_s",
                  "job_deadline_s")


@contextlib.contextmanager
def shard_groups(options: ClusterOptions, store_dir: Path, config: PipelineConfig) -> Iterator[RemoteShardsSpec]:
    """The remote shard groups of `options`, up for the block (see the module docstring)."""
    log = get_logger(worker="cluster")
    manifest = Manifest.load(store_dir)
    with contextlib.ExitStack() as stack:
        keys = options.keys if options.keys is not None else _throwaway_keys(stack)
        cluster = stack.enter_context(ray_cluster(options.address))
        shard_map = choose_shard_map(options, manifest.geometry, len(cluster.nodes))
        stores = [options.store_path(shard, shard_map.num_shards) for shard in range(shard_map.num_shards)]
        if options.store_dir is None:
            stores = [str(path) for path in copied_shard_stores(store_dir, manifest, shard_map)]
        groups = _start_groups(cluster, shard_map, stores, keys, config, log)
        yield RemoteShardsSpec([group.endpoint for group in groups], str(keys), shard_map.replicas, shard_map.layers,
                               shard_map.experts_per_layer, [list(shards) for shards in shard_map.placements],
                               options.deadline_s, options.wire_precision)


def choose_shard_map(options: ClusterOptions, geometry: Geometry, num_nodes: int) -> ShardMap:
    """`--shard-map` (checked against the model, --shards and --replicas) or the uniform map."""
    if options.shard_map is not None:
        shard_map = read_shard_map(options.shard_map)
        check_map_fits(shard_map, geometry, options.shards or shard_map.num_shards)
        if options.replicas is not None and options.replicas != shard_map.replicas:
            raise ConfigError(f"--replicas {options.replicas}: the shard map {options.shard_map} has "
                              f"{shard_map.replicas} replicas per expert")
    else:
        shards = options.shards or num_nodes
        replicas = options.replicas or 1
        if replicas > shards:
            raise ConfigError(f"--replicas {replicas}: more than the {shards} shards (each replica needs a shard "
                              f"group of its own; --cluster {options.address.text} has {num_nodes} nodes)")
        shard_map = uniform_map(geometry.num_moe_layers, geometry.experts_per_layer, shards, replicas)
    if shard_map.num_shards > num_nodes:
        raise ConfigError(f"--shards {shard_map.num_shards}: more shard groups than the {num_nodes} nodes of "
                          f"--cluster {options.address.text} (one shard group per node)")
    return shard_map


def copied_shard_stores(store_dir: Path, manifest: Manifest, shard_map: ShardMap) -> list[Path]:
    """Each shard's store, copied from the whole store at `store_dir` into the cache (`$MER_CACHE_DIR/shards`)
    and reused while its manifest names this model and this map."""
    map_hash = shard_map_hash(shard_map)
    base = read_environment().cache_dir / "shards" / f"{manifest.source.hash[:16]}-{map_hash[:16]}"
    base.mkdir(parents=True, exist_ok=True)
    map_path = base / "shard-map.json"
    write_shard_map(map_path, shard_map)
    paths = []
    for shard in range(shard_map.num_shards):
        path = base / f"store-{shard}of{shard_map.num_shards}"
        if not _is_shard_store(path, manifest, map_hash, shard):
            copy_shard(store_dir, path, (shard, shard_map.num_shards), map_path, force=True)
        paths.append(path)
    return paths


def _is_shard_store(path: Path, whole: Manifest, map_hash: str, shard: int) -> bool:
    try:
        manifest = Manifest.load(path)
    except (MerError, OSError):
        return False
    held = manifest.shard
    return held is not None and held.map_hash == map_hash and held.index == shard and \
        manifest.source.hash == whole.source.hash


def graph_flags(config: PipelineConfig) -> tuple[str, ...]:
    """`shard-serve` flags carrying this command's graph settings (`FORWARDED_KEYS`)."""
    flags: list[str] = []
    for key in FORWARDED_KEYS:
        flags += [f"--{key.replace('_', '-')}", str(getattr(config, key))]
    return tuple(flags)


def _start_groups(cluster: RayCluster, shard_map: ShardMap, stores: list[str], keys: Path, config: PipelineConfig,
                  log) -> list[ShardGroupEndpoint]:
    import ray

    specs = [ShardGroupSpec(stores[shard], str(keys), shard, tuple(shard_map.experts_of(shard)), graph_flags(config))
             for shard in range(shard_map.num_shards)]
    work_dirs = [None if config.log_file is None else f"{config.log_file}.shard-{shard}"
                 for shard in range(shard_map.num_shards)]
    started = time.monotonic()
    calls = [cluster.nodes[shard].actor.start_shard_group.remote(spec, work_dir)
             for shard, (spec, work_dir) in enumerate(zip(specs, work_dirs, strict=True))]
    try:
        groups = ray.get(calls)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        raise (cause if isinstance(cause, MerError) else error) from None
    for shard, group in enumerate(groups):
        log.info("cluster_shard_group_started", shard=shard, node_index=group.node_index, node_ip=group.node_ip,
                 endpoint=group.endpoint, pid=group.pid, store=stores[shard], work_dir=group.work_dir,
                 experts=len(specs[shard].experts), start_seconds=group.start_seconds)
    log.info("cluster_shard_groups_ready", shards=len(groups), replicas=shard_map.replicas,
             seconds=round(time.monotonic() - started, 3))
    return groups


def _throwaway_keys(stack: contextlib.ExitStack) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="mer-cluster-keys-"))
    stack.callback(shutil.rmtree, directory, True)
    write_key_files(directory)
    return directory


def run_with_cluster(options: ClusterOptions | None, store_dir: Path, config: PipelineConfig,
                     run: Callable[[RemoteShardsSpec | None], int], command: str) -> int:
    """`run(None)` without --cluster; else `run(spec)` with the shard groups up (down again however it ends)."""
    if options is None:
        return run(None)
    started = time.monotonic()
    with shard_groups(options, store_dir, config) as spec:
        print(f"mer-pipeline {command}: --cluster {options.address.text}: {len(spec.endpoints)} shard groups "
              f"({spec.replicas} per expert) up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return run(spec)
