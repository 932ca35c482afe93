"""Prefetch during a prefill pass, in a real I/O worker (`IoService` on a real arena, the router's real
`IoClient`, hints on a real ZeroMQ socket as the predictor sends them).

A prefill pass is one token for the slot table, so with every slot holding an expert the pass used,
the plain rule (a prefetch never evicts what the current token used) admitted no prefetch for the rest
of the prompt. Within a prefill pass (the current token is before the generation's `SplitReads`
token) a layered run lets a hint for layer L evict the pass's experts of layers before L; in decode
the plain rule holds.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import zmq
import zmq.asyncio

from mer.config import PipelineConfig
from mer.io.service import IoService
from mer.logging_setup import get_logger
from mer.protocol import PrefetchHint, PrefetchHints, encode
from mer.router.io_client import IoClient
from mer.runtime.paths import new_run_id
from mer.runtime.run_spec import RunSpec
from mer.shm.arena import SlotArena
from mer.store.manifest import Manifest

NUM_SLOTS = 4
TIMEOUT_S = 10.0


async def admitted(service: IoService, expert_id: int, wait_s: float) -> bool:
    """Whether `expert_id` gets a slot (read started) within `wait_s`."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while asyncio.get_running_loop().time() < deadline:
        if service.table.lookup(expert_id) is not None:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("in_prefill", [True, False], ids=["prefill", "decode"])
def test_a_full_cache_admits_a_next_layer_prefetch_only_within_a_prefill_pass(pipeline_stores, tmp_path, leak_guard,
                                                                           in_prefill):
    store = pipeline_stores["tiny"]
    manifest = Manifest.load(store)
    per_layer = manifest.geometry.experts_per_layer
    assert per_layer >= NUM_SLOTS and manifest.geometry.num_moe_layers >= 2
    run_id = new_run_id()
    leak_guard.add_run(run_id)
    arena = SlotArena.create(run_id, NUM_SLOTS, manifest.slot_nbytes)
    config = PipelineConfig(store=store, cache_slots=NUM_SLOTS, compute_workers=1, prefetch=True, layered=True)
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    run = RunSpec(run_id, str(runtime), str(arena.path), NUM_SLOTS, manifest.slot_nbytes, str(store), os.getpid(), 1,
                  config.to_dict())

    async def scenario() -> tuple[bool, int]:
        context = zmq.asyncio.Context()
        service = IoService(config, run, get_logger(), context)
        await service.start()
        stop = asyncio.Event()
        serving = asyncio.create_task(service.serve(stop))
        client = IoClient(context, run.endpoint("io"))
        predictor = context.socket(zmq.DEALER)
        predictor.setsockopt(zmq.LINGER, 0)
        predictor.connect(run.endpoint("io"))
        try:
            token = 99
            await client.split_reads(100 if in_prefill else 50)  # token 99 is the prompt's pass, or a decode step
            grants = await asyncio.wait_for(client.acquire(token, list(range(NUM_SLOTS))), TIMEOUT_S)  # layer 0
            await client.release([grant.ref for grant in grants])
            assert service.table.num_free == 0
            layer_1_expert = per_layer
            await predictor.send_multipart(encode(PrefetchHints(token, [PrefetchHint(layer_1_expert, 1.0)], "gate")))
            result = await admitted(service, layer_1_expert, 1.0)
            return result, service.admission.counts().dropped
        finally:
            predictor.close(linger=0)
            client.close()
            stop.set()
            await serving
            await service.close()
            context.term()

    try:
        was_admitted, dropped = asyncio.run(scenario())
    finally:
        arena.destroy()
    assert was_admitted == in_prefill
    assert dropped == (0 if in_prefill else 1)
