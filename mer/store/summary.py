"""A description of an expert store for people and scripts (`mer-pipeline store info`)."""

from __future__ import annotations

from dataclasses import asdict
from itertools import groupby

from mer.store.manifest import LayerEntry
from mer.store.reader import ExpertStore


def layer_groups(layers: tuple[LayerEntry, ...]) -> list[dict]:
    """Runs of consecutive MoE layers with identical expert formats, one dict per run."""
    groups: list[dict] = []
    for (expert_format, stride), run in groupby(layers, key=lambda layer: (layer.format, layer.expert_stride)):
        run = list(run)
        groups.append({
            "first_layer": run[0].moe_layer,
            "last_layer": run[-1].moe_layer,
            "dtypes": {matrix.name: matrix.dtype for matrix in expert_format.matrices},
            "layouts": {matrix.name: matrix.layout for matrix in expert_format.matrices},
            "payload_nbytes": expert_format.payload_nbytes,
            "expert_stride": stride,
        })
    return groups


def store_summary(store: ExpertStore) -> dict:
    """Geometry, dtypes per layer group, sizes, layout and source of a store, as plain data."""
    manifest = store.manifest
    return {
        "store": str(store.directory),
        "format_version": manifest.format_version,
        "created_by": manifest.created_by,
        "checksum_algorithm": manifest.checksum_algorithm,
        "layout": manifest.layout,
        "geometry": asdict(manifest.geometry),
        "num_experts": manifest.geometry.num_experts,
        "layer_groups": layer_groups(manifest.layers),
        "slot_nbytes": manifest.slot_nbytes,
        "total_payload_nbytes": manifest.total_payload_nbytes(),
        "total_file_nbytes": sum(entry.nbytes for entry in manifest.files),
        "num_files": len(manifest.files),
        "source": asdict(manifest.source),
        "held_experts": len(manifest.experts),
        "shard": None if manifest.shard is None else {
            "index": manifest.shard.index, "count": manifest.shard.count, "map_hash": manifest.shard.map_hash,
            "replicas": manifest.shard.replicas, "experts": len(manifest.shard.experts)},
    }


def _layer_range(group: dict) -> str:
    first, last = group["first_layer"], group["last_layer"]
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def _source_text(source: dict) -> str:
    if source["kind"] == "synth":
        parameters = ", ".join(f"{key} {value}" for key, value in source["parameters"].items())
        return f"synth ({parameters})"
    paths = ", ".join(source["paths"]) or "?"
    return f"{source['kind']} {paths} ({source['nbytes']:,} bytes, hash {source['hash'] or '?'})"


def format_summary(summary: dict) -> str:
    """The summary as aligned human-readable lines."""
    geometry = summary["geometry"]
    lines = [
        f"store       {summary['store']}",
        f"format      mer_store {summary['format_version']}, layout {summary['layout']}, "
        f"checksums {summary['checksum_algorithm']}, created by {summary['created_by'] or '?'}",
        f"geometry    {geometry['architecture']}: {geometry['num_layers']} layers "
        f"({geometry['num_moe_layers']} MoE), {geometry['experts_per_layer']} experts per layer "
        f"({summary['num_experts']} in all), top-{geometry['top_k']}, d_model {geometry['d_model']}, "
        f"d_ff {geometry['d_ff']}",
    ]
    for group in summary["layer_groups"]:
        dtypes = ", ".join(f"{name} {dtype}" for name, dtype in group["dtypes"].items())
        lines.append(f"dtypes      {_layer_range(group)}: {dtypes}")
    for group in summary["layer_groups"]:
        lines.append(f"expert      {_layer_range(group)}: {group['payload_nbytes']:,} payload bytes, "
                     f"stride {group['expert_stride']:,}")
    lines += [
        f"slot        {summary['slot_nbytes']:,} bytes",
        f"total       {summary['total_payload_nbytes']:,} payload bytes, "
        f"{summary['total_file_nbytes']:,} bytes in {summary['num_files']} files",
        f"source      {_source_text(summary['source'])}",
    ]
    shard = summary.get("shard")
    if shard is not None:
        lines.insert(3, f"shard       {shard['index']}/{shard['count']}: {shard['experts']} of "
                        f"{summary['num_experts']} experts (shard map {shard['map_hash'][:16]}, "
                        f"{shard['replicas']} replica{'s' if shard['replicas'] != 1 else ''} per expert)")
    return "\n".join(lines)
