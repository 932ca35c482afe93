"""Where the forward pass gets its experts computed: an `ExpertFn`.

    outputs = expert_fn(moe_layer, {expert: x_batch, ...})  # -> {expert: out_batch, ...}

is called once per MoE block with every expert the block's tokens were routed to (ids within the
layer, ascending) and the float32 `[tokens, d_model]` inputs of each; it returns each expert's
float32 `[tokens, d_model]` output (ungated). `moe_layer` numbers the MoE blocks 0.. as the expert
store does. The pipeline's router replaces the local implementations below by one that sends the
layer's work to the compute workers.

- `GGUFExperts`: computes on the experts' bytes in the GGUF (single process, no store).
- `StoreExperts`: reads each payload from a converted expert store (`ExpertStore.read_payload`).

Both compute an expert as the pipeline's compute workers do: `swiglu_expert(payload, x_batch, d_ff_slice,
ggml_rounding=True)` (llama.cpp's rounding of inputs) on each of the fixed d_ff slices of
`plan_slices(format, expert_slices)`, the partials added in slice order (`sum_slices`), so a
single-process generation gives the graph's logits bit for bit (with the same `expert_slices`, by
default the pipeline's). A whole-expert call would sum the down projection in another order and may
flip a near-tie token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from mer.compute.batches import item_partials, sum_slices
from mer.compute.expert_format import ExpertPayload
from mer.compute.slicing import DEFAULT_SLICES, plan_slices
from mer.store.convert import fill_payload
from mer.store.gguf_source import GGUFSource
from mer.store.reader import ExpertStore


class ExpertFn(Protocol):
    """Computes one MoE block's experts on their token batches (see the module docstring)."""

    def __call__(self, moe_layer: int, batches: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]: ...


class GGUFExperts:
    """Experts computed on the GGUF's own bytes (each payload assembled from its three matrices)."""

    def __init__(self, source: GGUFSource, threads: int = 1, expert_slices: int = DEFAULT_SLICES):
        self.source, self.threads, self.expert_slices = source, threads, expert_slices
        self.calls: list[tuple[int, tuple[int, ...]]] = []  # (moe_layer, experts) of every call

    def payload(self, moe_layer: int, expert: int) -> ExpertPayload:
        expert_format = self.source.expert_format(moe_layer)
        data = np.empty(expert_format.payload_nbytes, dtype=np.uint8)
        fill_payload(data, self.source.layers[moe_layer], expert, expert_format)
        return ExpertPayload(expert_format, data)

    def __call__(self, moe_layer: int, batches: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        self.calls.append((moe_layer, tuple(batches)))
        return {expert: sliced_expert(self.payload(moe_layer, expert), x, self.expert_slices, self.threads)
                for expert, x in batches.items()}


class StoreExperts:
    """Experts read from a converted expert store, one payload per expert and call."""

    def __init__(self, store: ExpertStore, threads: int = 1, expert_slices: int = DEFAULT_SLICES):
        self.store, self.threads, self.expert_slices = store, threads, expert_slices

    def __call__(self, moe_layer: int, batches: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        manifest = self.store.manifest
        return {expert: sliced_expert(self.store.read_payload(manifest.expert_id(moe_layer, expert)), x,
                                      self.expert_slices, self.threads)
                for expert, x in batches.items()}


def sliced_expert(payload: ExpertPayload, x: np.ndarray, expert_slices: int, threads: int) -> np.ndarray:
    """One expert's output on its rows `x` `[tokens, d_model]`, computed slice by slice as the compute
    workers compute it and summed as the router sums it."""
    slices = plan_slices(payload.format, expert_slices)
    return sum_slices(item_partials(payload, np.asarray(x, dtype=np.float32), slices, threads))
