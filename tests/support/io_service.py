"""The I/O worker in process on a new arena of the run, with the router's `IoClient`: for tests that
drive `IoService` directly (slot states, leases, quarantines) rather than through a whole graph."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import zmq.asyncio

from mer.config import PipelineConfig
from mer.io.service import IoService
from mer.logging_setup import get_logger
from mer.router.io_client import IoClient
from mer.runtime.paths import new_run_id
from mer.runtime.run_spec import RunSpec
from mer.shm.arena import SlotArena
from mer.store.manifest import Manifest


def run_io_service(leak_guard, config: PipelineConfig, tmp_path: Path, scenario):
    """`await scenario(service, client)` with the I/O worker of `config` (its store, `cache_slots` slots)
    serving; the service, the client, the context and the arena are closed afterwards. Returns the
    scenario's result."""
    store = Path(config.store)
    manifest = Manifest.load(store)
    num_slots = config.cache_slots
    run_id = new_run_id()
    leak_guard.add_run(run_id)
    arena = SlotArena.create(run_id, num_slots, manifest.slot_nbytes)
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    run = RunSpec(run_id, str(runtime), str(arena.path), num_slots, manifest.slot_nbytes, str(store), os.getpid(), 1,
                  config.to_dict())

    async def serving():
        context = zmq.asyncio.Context()
        service = IoService(config, run, get_logger(), context)
        stop = asyncio.Event()
        client = None
        try:
            await service.start()
            serve = asyncio.create_task(service.serve(stop))
            client = IoClient(context, run.endpoint("io"))
            result = await scenario(service, client)
            stop.set()
            await serve
            return result
        finally:
            if client is not None:
                client.close()
            await service.close()
            context.term()

    try:
        return asyncio.run(serving())
    finally:
        arena.destroy()
