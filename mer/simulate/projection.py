"""Bytes read per token and projected seconds per token of a simulated replay.

Bytes: every read (demand and prefetch) costs its expert's read size: from a store's manifest
(`ExpertSizes.from_store`, the slot read size of the expert's layer, exactly what the live I/O
worker reads), or one size for every expert (`ExpertSizes.uniform`, `--expert-bytes`).

Projection (`project_seconds_per_token`), per token on average, with B the disk bandwidth and C
the compute time per token:

    projected = max(C + stall_bytes / B, all_bytes / B)

A demand read stalls its step, so its time adds to compute; a prefetch read overlaps compute, but
the disk can read no more than B per second, so a token cannot take less than all its bytes / B.
Without prefetch (stall bytes = all bytes) this is C + bytes / B. B and C come from the command line
or are measured from a run log (`mer.simulate.log_measure`); the projection is left out when neither
is given.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mer.errors import ConfigError, TraceError
from mer.store.manifest import Manifest
from mer.routing.trace import TraceHeader

MEGABYTE = 10**6  # --disk-mbps is in MB/s (10^6 bytes per second)


@dataclass(frozen=True)
class ExpertSizes:
    """Bytes read per expert id: `bytes_of(expert_id)`; `source` says where the sizes come from."""

    bytes_of: Callable[[int], int]
    source: str

    @classmethod
    def uniform(cls, nbytes: int) -> "ExpertSizes":
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ConfigError(f"--expert-bytes must be a positive integer, got {nbytes!r}")
        return cls(lambda expert_id: nbytes, f"--expert-bytes {nbytes}")

    @classmethod
    def from_store(cls, directory: str | Path, header: TraceHeader, trace_path: str | Path) -> "ExpertSizes":
        """Read sizes from the store's manifest; TraceError unless the trace's geometry fits the store."""
        manifest = Manifest.load(Path(directory))
        check_trace_fits_store(header, manifest, trace_path, directory)
        read_nbytes = [manifest.layer_of(entry.id).format.read_nbytes for entry in manifest.experts]
        return cls(read_nbytes.__getitem__, f"store {directory}")

    def total(self, reads_per_expert: Counter) -> int:
        """Bytes of the reads counted per expert id."""
        return sum(self.bytes_of(expert) * count for expert, count in reads_per_expert.items())


def check_trace_fits_store(header: TraceHeader, manifest: Manifest, trace_path: str | Path,
                           store_dir: str | Path) -> None:
    """TraceError naming both geometries unless the trace is a flat or layered trace of this store."""
    geometry = manifest.geometry
    layered = (geometry.num_moe_layers, geometry.experts_per_layer)
    flat = (1, geometry.num_experts)
    if (header.layers, header.experts_per_layer) in (layered, flat):
        return
    raise TraceError(
        f"{trace_path}: the trace's geometry ({header.layers} layer(s) x {header.experts_per_layer} experts) "
        f"does not fit the store {store_dir} ({geometry.num_moe_layers} MoE layers x "
        f"{geometry.experts_per_layer} experts: a layered trace has {geometry.num_moe_layers} layer(s) x "
        f"{geometry.experts_per_layer} experts, a flat-pool trace 1 layer x {geometry.num_experts})"
    )


@dataclass(frozen=True)
class ProjectionInputs:
    """Disk bandwidth (bytes/s) and compute time per token (s), with where each came from."""

    disk_bytes_per_s: float
    compute_s_per_token: float
    disk_source: str
    compute_source: str

    def to_json_dict(self) -> dict:
        return {"disk_mbps": self.disk_bytes_per_s / MEGABYTE, "compute_ms_per_token": self.compute_s_per_token * 1e3,
                "disk_source": self.disk_source, "compute_source": self.compute_source}


def resolve_projection_inputs(disk_mbps: float | None, compute_ms_per_token: float | None,
                              log_path: str | Path | None) -> ProjectionInputs | None:
    """The projection's inputs from the flags and the log (flags win), or None when none is given.

    ConfigError when only one of the two can be found (a bandwidth without a compute time, or the
    other way round), or when a given value is not a positive number.
    """
    if disk_mbps is None and compute_ms_per_token is None and log_path is None:
        return None
    for flag, value in (("--disk-mbps", disk_mbps), ("--compute-ms-per-token", compute_ms_per_token)):
        if value is not None and not (value > 0 and value != float("inf")):
            raise ConfigError(f"{flag} must be a positive number, got {value!r}")
    disk = None if disk_mbps is None else (disk_mbps * MEGABYTE, f"--disk-mbps {disk_mbps:g}")
    compute = None if compute_ms_per_token is None else (compute_ms_per_token / 1e3,
                                                        f"--compute-ms-per-token {compute_ms_per_token:g}")
    if log_path is not None:
        from mer.simulate.log_measure import measure_run_log

        measured = measure_run_log(log_path)
        if compute is None:
            compute = (measured.compute_s_per_token, f"{log_path}: compute per token")
        if disk is None and measured.disk_bytes_per_s is not None:
            disk = (measured.disk_bytes_per_s, f"{log_path}: bytes / latency of {measured.reads} reads")
    if disk is None:
        where = f"{log_path} has no expert reads to measure it from" if log_path is not None else "none given"
        raise ConfigError(f"the projection needs a disk bandwidth: give --disk-mbps ({where})")
    if compute is None:
        raise ConfigError("the projection needs a compute time: give --compute-ms-per-token or --from-log FILE")
    return ProjectionInputs(disk[0], compute[0], disk[1], compute[1])


def project_seconds_per_token(inputs: ProjectionInputs, stall_bytes_per_token: float,
                              bytes_per_token: float) -> float:
    """max(compute + stall bytes / bandwidth, all bytes / bandwidth), per token."""
    bandwidth = inputs.disk_bytes_per_s
    return max(inputs.compute_s_per_token + stall_bytes_per_token / bandwidth, bytes_per_token / bandwidth)
