"""Copy one shard out of an existing store (`mer-pipeline store shard`), without the GGUF.

Each held expert's payload is read from the source store, checked against the source manifest's
checksum (a corrupt source expert is refused, naming it), and written by `StoreWriter` exactly as
`convert --shard` writes it (same layer files, offsets and manifest, atomic finish with the
read-back check). The manifest keeps the source's geometry, layout and source record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mer.errors import StoreError
from mer.logging_setup import get_logger
from mer.store.checksum import payload_checksum
from mer.store.convert import ConversionResult, check_replaceable
from mer.store.reader import ExpertStore
from mer.store.shard_choice import shard_info
from mer.store.writer import PhaseStarter, StoreWriter, lazy_phase


def copy_shard(store: str | os.PathLike, out: str | os.PathLike, shard: tuple[int, int],
               shard_map: str | os.PathLike | None = None, *, force: bool = False,
               start_phase: PhaseStarter | None = None) -> ConversionResult:
    """Write shard `shard = (i, N)` of the store at `store` (under `shard_map`, else the uniform map) to `out`.

    StoreError when the source lacks an expert of the shard or one of its payloads fails its checksum;
    ConfigError / ShardMapError as for `convert --shard`. Nothing is left at `out` when it fails.
    """
    started = time.perf_counter()
    source = ExpertStore.open(store)
    manifest = source.manifest
    out = Path(out)
    check_replaceable(out, force)
    held_shard = shard_info(manifest.geometry, *shard, shard_map)
    missing = [expert_id for expert_id in held_shard.experts if not manifest.holds(expert_id)]
    if missing:
        raise StoreError(f"{source.directory}: lacks {len(missing)} experts of {held_shard.describe()} "
                         f"(first: {manifest.describe(missing[0])}); copy from a whole store")
    total = sum(manifest.layer_of(expert_id).format.payload_nbytes for expert_id in held_shard.experts)
    writer = StoreWriter(out, manifest.geometry, [layer.format for layer in manifest.layers], manifest.source,
                         blocks=[layer.block for layer in manifest.layers], layout=manifest.layout, force=force,
                         verify_progress=lazy_phase(start_phase, "verifying", total), shard=held_shard)
    copying = lazy_phase(start_phase, "copying", total)
    copied = 0
    with writer:
        for expert_id in held_shard.experts:
            payload = source.read_payload(expert_id).data
            if payload_checksum(payload) != manifest.expert(expert_id).checksum:
                raise StoreError(f"{source.file_path(expert_id)}: {manifest.describe(expert_id)} does not match its "
                                 "checksum in the source store (run `mer-pipeline store verify`); nothing was written")
            writer.write_expert(expert_id, payload)
            copied += payload.nbytes
            copying(payload.nbytes)
    result = ConversionResult(out, len(held_shard.experts), copied, time.perf_counter() - started,
                              manifest.source.hash, held_shard)
    get_logger().info("store_shard_copied", source=str(source.directory), **result.to_dict())
    return result
