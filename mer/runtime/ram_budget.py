"""Sizing the slot arena from a RAM budget for the whole process graph (`generate --ram-budget`).

The graph's resident memory (Pss, shared pages counted once) is counted as dense weights (every
non-expert tensor, mapped by the router) + KV cache (float32 K and V) + the processes themselves
(`processes_nbytes`, measured; the predictor is a heavy process with the gate predictor) + the GGUF's
parsed metadata in each process that opens it (`metadata_nbytes`, measured) + the slot arena (cache
slots + prefetch reserve), and `HEADROOM_NBYTES` is kept free for transients (a first run's kernel
compiles). The cache gets every slot that fits in what is left (at most one per
expert); a budget that cannot hold the fixed part plus k experts of one layer (and the prefetch
reserve) is refused with the numbers. docs/model.md ("RAM budget") gives the measurements.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mer.errors import ConfigError
from mer.store.gguf_source import MERGED_EXPERT_TENSOR, PER_EXPERT_TENSOR, GGUFSource

if TYPE_CHECKING:
    from mer.model.hparams import HParams

MIB = 2**20
# Pss of each process of the graph with its imports and kernels loaded, without the model's weights,
# KV cache or slots: measured on this machine (docs/model.md, "RAM budget": supervisor 86, router 92,
# compute worker 85, I/O worker 34, predictor 32, multiprocessing's resource tracker 7 MiB), rounded up.
HEAVY_PROCESS_NBYTES = 96 * MIB  # numpy + numba + kernels: supervisor (the CLI), router, each compute worker
LIGHT_PROCESS_NBYTES = 40 * MIB  # I/O worker, predictor
TRACKER_NBYTES = 8 * MIB
# Pss per metadata array element after `gguf.GGUFReader` parsed a file: 0.87-1.05 KiB measured on
# vocabularies of 32k and 150k tokens (SentencePiece: tokens, scores, types; BPE: tokens, types, merges).
METADATA_BYTES_PER_ELEMENT = 1024
GGUF_READING_PROCESSES = 2  # the CLI (supervisor) and the router parse the GGUF's metadata
# Kept free within the budget for what the steady-state figures above miss: a first run compiles the
# kernels (LLVM's working memory: peak RSS +118 MB in the router, +90 MB in each compute worker and in
# the CLI, measured with a cold numba cache), allocator slack, and the page cache the kernel needs for
# logs and metadata reads. Without it a 12 GiB cgroup planned to the byte OOM-killed the I/O worker
# while the router compiled (docs/model.md, "RAM budget").
HEADROOM_NBYTES = 512 * MIB


def prefetch_reserve_slots(config) -> int:
    """Arena slots kept for prefetch reads beyond the cache: one per hint of a prediction (with prefetch)."""
    return config.predict_fanout if config.prefetch else 0


def pool_slots(config) -> int:
    """Slots in the arena (a `PipelineConfig`'s): the cache plus the prefetch reserve."""
    return config.cache_slots + prefetch_reserve_slots(config)


def processes_nbytes(num_compute_workers: int, gate_predictor: bool = False) -> int:
    """The graph's processes without the model: supervisor, router, compute workers, I/O, predictor, tracker
    (the predictor is a heavy process with the gate predictor)."""
    heavy = 2 + num_compute_workers + gate_predictor  # supervisor, router, compute workers (, predictor)
    light = 2 - gate_predictor  # I/O worker (, predictor)
    return heavy * HEAVY_PROCESS_NBYTES + light * LIGHT_PROCESS_NBYTES + TRACKER_NBYTES
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in `8GiB`, `512MiB`, `1.5G` (binary), `2GB` (decimal) or a plain byte count."""
    match = _SIZE.match(str(text))
    unit = match.group("unit").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"RAM budget {text!r} is not a size: use e.g. 8GiB, 512MiB, 1.5G or a byte count")
    return int(float(match.group("number")) * _UNITS[unit])


def dense_nbytes(source: GGUFSource) -> int:
    """Bytes of every tensor that is not an expert matrix (what the router maps and touches); the skipped
    NextN blocks (`GGUFSource.is_skipped`) are never loaded, so not counted."""
    return sum(tensor.nbytes for part in source.parts for tensor in part.tensors
               if not (MERGED_EXPERT_TENSOR.match(tensor.name) or PER_EXPERT_TENSOR.match(tensor.name)
                       or source.is_skipped(tensor.name)))


def metadata_nbytes(source: GGUFSource, gate_predictor: bool = False) -> int:
    """The parsed metadata of the GGUF in every process that opens it (see METADATA_BYTES_PER_ELEMENT);
    with the gate predictor, the predictor opens it too."""
    elements = sum(len(field.data) for part in source.parts for field in part.reader.fields.values())
    return (GGUF_READING_PROCESSES + gate_predictor) * elements * METADATA_BYTES_PER_ELEMENT


def kv_cache_nbytes(hparams: HParams, positions: int) -> int:
    """Float32 keys and values of `positions` positions in every block (MLA, deepseek2: the compressed kv
    and the shared rope key only, `HParams.kv_floats_per_position`), as `KVCache` allocates them."""
    return hparams.num_blocks * positions * hparams.kv_floats_per_position * 4


@dataclass(frozen=True)
class RamPlan:
    """How a RAM budget is spent; `cache_slots` is what is left for the expert cache."""

    budget: int
    dense_nbytes: int
    kv_cache_nbytes: int
    num_processes: int
    processes_nbytes: int
    slot_nbytes: int
    reserve_slots: int  # prefetch reserve (the arena holds cache_slots + reserve_slots)
    cache_slots: int
    metadata_nbytes: int = 0
    origin: str = ""  # how the budget was chosen, when not given (e.g. "default: ... available")
    headroom_nbytes: int = HEADROOM_NBYTES

    @property
    def fixed_nbytes(self) -> int:
        return (self.dense_nbytes + self.kv_cache_nbytes + self.processes_nbytes + self.metadata_nbytes
                + self.headroom_nbytes)

    @property
    def arena_nbytes(self) -> int:
        return (self.cache_slots + self.reserve_slots) * self.slot_nbytes

    def describe_fixed(self) -> str:
        return (f"dense weights {self.dense_nbytes / MIB:,.1f} MiB, KV cache {self.kv_cache_nbytes / MIB:,.1f} MiB, "
                f"{self.num_processes} processes {self.processes_nbytes / MIB:,.0f} MiB, "
                f"GGUF metadata {self.metadata_nbytes / MIB:,.1f} MiB, headroom {self.headroom_nbytes / MIB:,.0f} MiB")

    def describe(self) -> str:
        origin = f" ({self.origin})" if self.origin else ""
        return (f"RAM budget {self.budget / MIB:,.1f} MiB{origin}: {self.describe_fixed()}, slot arena {self.cache_slots} + "
                f"{self.reserve_slots} slots x {self.slot_nbytes / MIB:,.2f} MiB = {self.arena_nbytes / MIB:,.1f} MiB")


def plan_cache_slots(budget: int, *, dense: int, kv_cache: int, num_compute_workers: int, slot_nbytes: int,
                     top_k: int, reserve_slots: int, num_experts: int, metadata: int = 0,
                     gate_predictor: bool = False, origin: str = "") -> RamPlan:
    """The cache slots a budget allows (at most `num_experts`); ConfigError with the numbers when it
    cannot hold the fixed part plus `top_k` experts of one layer and the prefetch reserve."""
    processes = processes_nbytes(num_compute_workers, gate_predictor)
    plan = RamPlan(budget, dense, kv_cache, 5 + num_compute_workers, processes, slot_nbytes, reserve_slots, 0, metadata,
                   origin)
    fitting = (budget - plan.fixed_nbytes) // slot_nbytes - reserve_slots
    if fitting < top_k:
        needed = plan.fixed_nbytes + (top_k + reserve_slots) * slot_nbytes
        reserve = f" and {reserve_slots} prefetch slots (--no-prefetch frees them)" if reserve_slots else ""
        raise ConfigError(
            f"RAM budget {budget / MIB:,.1f} MiB cannot hold the dense part ({plan.fixed_nbytes / MIB:,.1f} MiB: "
            f"{plan.describe_fixed()}) plus {top_k} experts of one layer ({top_k} x {slot_nbytes / MIB:,.2f} MiB)"
            f"{reserve}: it needs at least {needed / MIB:,.1f} MiB"
        )
    return dataclasses.replace(plan, cache_slots=int(min(fitting, num_experts)))
