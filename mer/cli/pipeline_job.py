"""Run one job through the process graph from the CLI: configure, supervise, print the summary."""

from __future__ import annotations

import json
import signal
import sys

import uvloop

from mer.config import PipelineConfig, validate_against_geometry
from mer.logging_setup import configure_logging
from mer.store.reader import ExpertStore
from mer.summary import RunSummary, format_seed_block
from mer.supervisor import Supervisor


def run_pipeline_job(config: PipelineConfig, *, as_json: bool) -> int:
    """Start the graph for `config`, run its job, print the summary; 0 on success."""
    store = ExpertStore.open(config.store)
    validate_against_geometry(config, store.manifest.geometry)
    if config.log_file:
        log_stream = open(config.log_file, "a", buffering=1)
        configure_logging("mer-supervisor", stream=log_stream, level="info")
    else:
        configure_logging("mer-supervisor", level="warning")
    supervisor = Supervisor(config, store)
    summary = uvloop.run(_with_signals(supervisor))
    if as_json:
        print(json.dumps(summary))
    else:
        print(format_seed_block(RunSummary.from_json_dict(summary)))
    return 0


async def _with_signals(supervisor: Supervisor) -> dict:
    """Run the supervisor; SIGINT/SIGTERM cancel it, which shuts the graph down cleanly."""
    import asyncio

    task = asyncio.create_task(supervisor.run())
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def interrupt(signal_number: int) -> None:
        received.append(signal_number)
        task.cancel()

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, interrupt, signal_number)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            print(f"mer-pipeline: {signal.Signals(received[0]).name}: graph shut down", file=sys.stderr)
            raise KeyboardInterrupt from None
        raise
