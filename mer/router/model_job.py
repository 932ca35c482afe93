"""What the jobs that run a model share (generation and serving): the graph's clients, the one
dispatcher (the graph's, or the remote shard groups' with `--cluster`), and loading the model's dense part
in the router with its kernels warmed up.

The router loads the model once, with its dense weights resident (`mer.model.resident`: read into the
router's memory, so expert traffic cannot evict them), and checks it against the run's expert store.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import numpy as np

from mer.config import PipelineConfig
from mer.model.model import MoEModel, check_model_matches_store
from mer.router.compute_client import ComputeClient
from mer.router.io_client import IoClient
from mer.router.remote_dispatcher import job_dispatcher
from mer.router.graph_forward import DenseThread
from mer.router.job import Job
from mer.store.manifest import Manifest


class ModelJob(Job):
    """A job running a model's forward pass through the graph (`start.model` names its GGUF)."""

    def __init__(self, start, config: PipelineConfig, manifest: Manifest, io: IoClient, compute: ComputeClient,
                 observe, log, send_control: Callable[[object], Awaitable[None]]):
        self.start = start
        self.config = config
        self.manifest = manifest
        self.io = io
        self.compute = compute
        self.observe = observe  # a PUSH socket to the predictor
        self.log = log
        self.send_control = send_control
        self.dispatcher = job_dispatcher(start, manifest, io, compute, config, log)
        self.compute_workers = compute.num_workers

    async def load_model(self, dense: DenseThread) -> tuple[MoEModel, float]:
        """The model (dense weights resident, checked against the store) and the seconds its warm-up took."""
        model = await dense(MoEModel.load, self.start.model, 1, True)
        check_model_matches_store(model, self.manifest, self.start.model)
        return model, await dense(warm_up_dense, model)

    async def close(self) -> None:
        await self.dispatcher.close()


def warm_up_dense(model: MoEModel) -> float:
    """Compile (or load from numba's cache) the dense kernels on a throwaway one-token pass of the
    first block and the LM head, so that the prefill time does not include it; returns seconds."""
    started = time.perf_counter()
    cache = model.new_kv_cache(1)
    hidden = model.attention_block(0, model.embed([0]), cache, np.arange(1))
    normed = model.ffn_input(0, hidden)
    if model.is_moe_block(0):
        model.route(0, normed)
    else:
        model.dense_ffn(0, normed)
    model.logits(hidden)
    return time.perf_counter() - started
