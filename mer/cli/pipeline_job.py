"""Run one job through the process graph from the CLI: configure, supervise, print the summary."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import uvloop

from mer.config import PipelineConfig, validate_against_geometry
from mer.errors import Terminated
from mer.protocol import StartBenchmark
from mer.logging_setup import configure_logging, with_log_writes_in_background
from mer.store.reader import ExpertStore
from mer.metrics.summary import JobSummary, RunSummary, format_seed_block
from mer.runtime.supervisor import Supervisor


def run_pipeline_job(config: PipelineConfig, *, as_json: bool, stay_up: bool = False,
                     job: StartBenchmark = StartBenchmark()) -> int:
    """Start the graph for `config`, run its job, print the summary; 0 on success.

    With `stay_up` (an interactive `up`), the summary is printed as soon as the job is done and the
    graph stays up showing live figures until Ctrl-C, which then ends the command with 0.
    """
    store = ExpertStore.open(config.store)
    validate_against_geometry(config, store.manifest.geometry)
    configure_logging("mer-supervisor", log_file=config.log_file)
    printed: list[RunSummary] = []

    def print_summary(summary: RunSummary) -> None:
        printed.append(summary)
        print(json.dumps(summary.to_json_dict()) if as_json else format_seed_block(summary), flush=True)

    supervisor = Supervisor(config, store, on_job_done=show_live_figures(print_summary) if stay_up else None,
                            job=job)
    try:
        summary = uvloop.run(_with_signals(supervisor))
    except KeyboardInterrupt:
        if printed:  # Ctrl-C ended an interactive `up` after its job: a normal end
            return 0
        raise
    print_summary(summary)
    return 0


def show_live_figures(print_summary):
    """After the job: print the summary, then one live status line a second until cancelled."""

    async def hold(summary: RunSummary, supervisor: Supervisor) -> None:
        print_summary(summary)
        print("graph is up; Ctrl-C to stop", file=sys.stderr)
        while True:
            print("\r  " + supervisor.status_line(), end="", file=sys.stderr, flush=True)
            await asyncio.sleep(1.0)

    return hold


async def _with_signals(supervisor: Supervisor) -> JobSummary:
    """Run the supervisor; SIGINT/SIGTERM cancel it, which shuts the graph down cleanly, then raise
    KeyboardInterrupt (SIGINT: exit 130) or Terminated (SIGTERM: exit 143), see `mer.cli.exit_status`."""
    task = asyncio.create_task(with_log_writes_in_background(supervisor.run()))
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
            message = f"{signal.Signals(received[0]).name}: graph shut down"
            raise (Terminated(message) if received[0] == signal.SIGTERM else KeyboardInterrupt(message)) from None
        raise
