"""A single-process reference of the benchmark's outputs, for tests and parity checks.

It draws the same routing decisions and hidden states as the router, reads each expert with plain
buffered reads, runs the same SwiGLU slices (with llama.cpp's input rounding, as the workers do)
and combines them in the same order, with no processes, sockets or slots. The graph's outputs must equal these within float32 rounding.
"""

from __future__ import annotations

import numpy as np

from mer.config import PipelineConfig
from mer.router.bench_job import synthetic_hidden_state
from mer.routing.space import RoutingSpace
from mer.compute.batches import item_partials, sum_slices, weighted_sum
from mer.compute.slicing import plan_slices
from mer.store.reader import ExpertStore
from mer.routing.workloads.factory import make_workload


def reference_outputs(config: PipelineConfig, store: ExpertStore) -> np.ndarray:
    """Outputs of shape (tokens x decisions per token, 1, d_model), as the router's `dump_outputs`."""
    manifest = store.manifest
    geometry = manifest.geometry
    space = RoutingSpace.from_geometry(geometry, config.top_k, config.layered)
    workload = make_workload(config.workload, space, seed=config.seed, zipf_s=config.zipf_s,
                             correlation=config.workload_correlation, trace_path=config.trace)
    slices = [plan_slices(layer.format, config.expert_slices) for layer in manifest.layers]
    outputs = []
    for token in range(config.tokens):
        for decision in workload.next_token():
            expert_ids = space.global_ids(decision)
            x = synthetic_hidden_state(config.seed, token, decision.layer, geometry.d_model)
            experts = [sum_slices(item_partials(store.read_payload(expert_id), x,
                                                slices[expert_id // geometry.experts_per_layer]))
                       for expert_id in expert_ids]
            outputs.append(weighted_sum(experts, decision.weights))
    return np.stack(outputs)
