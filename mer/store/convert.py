"""Convert a Mixture-of-Experts GGUF model into an expert store.

Each expert's gate ‖ up ‖ down matrices are copied byte for byte from the GGUF (never requantized)
into one page-aligned payload; with `layout="planar"` each matrix is permuted losslessly by
`mer.quant.planar.to_planar` on the way. Dense weights stay in the GGUF. The store is written by
`StoreWriter` (temporary directory, free-space check, re-verification, rename), and its manifest
records the GGUF's paths, size and content identity (`mer.store.gguf_identity`), computed from
the same bytes that are copied, and its fingerprint and file stats (`mer.store.gguf_fingerprint`,
taken before the copy) by which `mer.store.store_cache` finds the store at start-up.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mer.errors import ConfigError, DiskSpaceError, StoreError, StoreExistsError
from mer.compute.expert_format import ExpertFormat
from mer.logging_setup import get_logger
from mer.store.gguf_fingerprint import gguf_fingerprint, source_file_stats
from mer.store.gguf_identity import TensorChecksums
from mer.store.gguf_source import GGUFSource, MoELayerSource, read_gguf_source
from mer.store.manifest import MANIFEST_NAME, ShardInfo, SourceInfo
from mer.store.shard_choice import shard_info
from mer.store.writer import MatrixTransform, PhaseStarter, StoreWriter, lazy_phase, matrix_transform


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion produced."""

    out: Path
    num_experts: int
    nbytes: int  # expert payload bytes copied
    seconds: float
    source_hash: str
    shard: ShardInfo | None = None

    def to_dict(self) -> dict:
        data = {"out": str(self.out), "experts": self.num_experts, "bytes": self.nbytes,
                "seconds": round(self.seconds, 3), "source_hash": self.source_hash}
        if self.shard is not None:
            data["shard"] = f"{self.shard.index}/{self.shard.count}"
        return data


def payload_nbytes(source: GGUFSource, held: list[int] | None = None) -> int:
    """Expert payload bytes a conversion of `source` copies (the progress total): every expert, or `held`."""
    per_layer = [source.expert_format(layer.moe_layer).payload_nbytes for layer in source.layers]
    if held is None:
        return sum(per_layer) * source.geometry.experts_per_layer
    return sum(per_layer[expert_id // source.geometry.experts_per_layer] for expert_id in held)


def convert_gguf(model: str | os.PathLike, out: str | os.PathLike, *, layout: str = "native", force: bool = False,
                 start_phase: PhaseStarter | None = None, shard: tuple[int, int] | None = None,
                 shard_map: str | os.PathLike | None = None) -> ConversionResult:
    """Convert the GGUF `model` (a split model: any of its parts) into an expert store at `out`.

    Raises GGUFError / ShapeError / UnsupportedDTypeError for a bad model, StoreExistsError when
    `out` exists and `force` is false (or is not a store), DiskSpaceError when it does not fit.
    Nothing is left at `out` or beside it when it fails. `start_phase` reports progress of the
    two phases, "copying" and "verifying" (the read-back check), in payload bytes. With
    `shard=(i, N)` the store holds only the experts shard i holds under `shard_map` (a map file; the
    uniform map of N shards without one), `mer.store.shard_choice`; ConfigError / ShardMapError for a
    bad shard or a map that does not fit the model.
    """
    started, t_start = time.perf_counter(), time.monotonic()
    transform = matrix_transform(layout)
    source = read_gguf_source(model)
    out = Path(out)
    check_replaceable(out, force)
    if shard_map is not None and shard is None:
        raise ConfigError(f"--shard-map {shard_map} needs --shard i/N (which shard of the map to write)")
    held_shard = shard_info(source.geometry, *shard, shard_map) if shard is not None else None
    held = list(held_shard.experts) if held_shard is not None else None
    formats = [source.expert_format(layer.moe_layer, layout) for layer in source.layers]
    source_info = SourceInfo("gguf", tuple(str(path.resolve()) for path in source.paths), source.nbytes,
                             fingerprint=gguf_fingerprint(source.parts), stats=source_file_stats(source.paths))
    total = payload_nbytes(source, held)
    writer = StoreWriter(out, source.geometry, formats, source_info, blocks=[layer.block for layer in source.layers],
                         layout=layout, force=force, verify_progress=lazy_phase(start_phase, "verifying", total),
                         shard=held_shard)
    checksums = TensorChecksums()  # a shard copies only some of each tensor: identity() then reads the rest
    shard_field = {} if held_shard is None else {"shard": f"{held_shard.index}/{held_shard.count}"}
    get_logger().info("convert_started", model=str(source.paths[0]), out=str(out), layout=layout,
                      moe_layers=len(source.layers), experts=len(writer.held), bytes=total, t_start=t_start,
                      **shard_field)
    try:
        with writer:
            copying = lazy_phase(start_phase, "copying", total)
            copied = _copy_experts(source, formats, writer, checksums if held is None else None, transform, copying,
                                   set(writer.held))
            writer.source = replace(source_info, hash=checksums.identity(source.parts))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskSpaceError(f"{out}: the filesystem ran out of space while writing the store ({error})") from error
        raise StoreError(f"{out}: cannot write the store: {error}") from error
    result = ConversionResult(out, len(writer.held), copied, time.perf_counter() - started,
                              writer.source.hash, held_shard)
    get_logger().info("convert_done", **result.to_dict())
    return result


def _copy_experts(source: GGUFSource, formats: list[ExpertFormat], writer: StoreWriter,
                  checksums: TensorChecksums | None, transform: MatrixTransform | None,
                  progress: Callable[[int], None], held: set[int]) -> int:
    copied = 0
    log = get_logger()
    for layer, expert_format in zip(source.layers, formats):
        payload = np.empty(expert_format.payload_nbytes, dtype=np.uint8)
        first = layer.moe_layer * source.geometry.experts_per_layer
        experts = [expert for expert in range(source.geometry.experts_per_layer) if first + expert in held]
        for expert in experts:
            fill_payload(payload, layer, expert, expert_format, checksums, transform)
            writer.write_expert(first + expert, payload)
            copied += payload.nbytes
            progress(payload.nbytes)
        log.info("convert_layer_done", moe_layer=layer.moe_layer, block=layer.block,
                 experts=len(experts), tensors=sum(len(matrix.tensors) for matrix in layer.matrices),
                 bytes=payload.nbytes * len(experts))
    return copied


def fill_payload(payload: np.ndarray, layer: MoELayerSource, expert: int, expert_format: ExpertFormat,
                 checksums: TensorChecksums | None = None, transform: MatrixTransform | None = None) -> None:
    """Copy one expert's gate, up and down bytes (optionally transformed), then its biases if it has
    any, from the GGUF into `payload`."""
    for matrix_source, matrix in zip(layer.matrices, expert_format.matrices):
        tensor, raw = matrix_source.expert_bytes(expert)
        if checksums is not None:
            checksums.update(tensor, raw)
        target = payload[matrix.offset : matrix.offset + matrix.nbytes]
        target[:] = raw if transform is None else transform(matrix.dtype, raw, matrix.rows, matrix.columns)
    for (tensor, raw), (start, stop) in zip(layer.bias_bytes(expert), expert_format.bias_ranges()):
        if checksums is not None:
            checksums.update(tensor, raw)
        payload[start:stop] = raw


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse an existing `out` without `force`; with it, replace only a store or an empty directory."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise StoreExistsError(f"{out}: output already exists (use --force to replace it)")
    is_store = out.is_dir() and (out / MANIFEST_NAME).is_file()
    if out.is_symlink() or not out.is_dir() or not (is_store or not any(out.iterdir())):
        raise StoreExistsError(f"{out}: exists and is not an expert store or an empty directory; "
                               f"--force replaces only those")
