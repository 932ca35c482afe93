"""Real `mer-pipeline run`s shared by every test of a module (the log-analysis tests read their logs).

The runs happen before the per-test leak guard of `tests/conftest.py` starts, so `module_runs`
gives them their own runtime base directory and checks itself, after each run, that nothing of it
is left: no `/dev/shm/mer-<run>-*` file, no runtime directory, no live child process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline_runs import PipelineRun, run_pipeline


class RunIds:
    """Collects the run ids `run_pipeline` reports (it expects a leak guard)."""

    def __init__(self):
        self.run_ids: set[str] = set()

    def add_run(self, run_id: str) -> None:
        self.run_ids.add(run_id)

    def add_supervisor_pid(self, pid: int) -> None:
        pass


def leftovers(run: PipelineRun, runtime_base: Path) -> list[str]:
    """Anything of the run still on the machine: /dev/shm files, runtime dirs, live children."""
    run_ids = {event["run_id"] for event in run.events if event.get("run_id")}
    found = [f"/dev/shm/{name}" for name in os.listdir("/dev/shm")
             if any(name.startswith(f"mer-{run_id}") for run_id in run_ids)]
    found += [str(path) for run_id in run_ids for path in runtime_base.glob(f"mer-{run_id}*")]
    for event in run.events_named("child_spawned"):
        try:
            state = Path(f"/proc/{event['child_pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):
            found.append(f"process {event['child']} ({event['child_pid']})")
    return found


def module_runs(store: Path, flags_by_name: dict[str, tuple[Any, ...]], tmp_path_factory) -> dict[str, PipelineRun]:
    """Run `mer-pipeline run --store STORE FLAGS --log-file ... --json` once per entry; each must succeed
    and leave nothing behind."""
    workdir = tmp_path_factory.mktemp("logs")
    runtime_base = tmp_path_factory.mktemp("rt")
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MER_RUNTIME_DIR", str(runtime_base))
        for name, flags in flags_by_name.items():
            run = run_pipeline(RunIds(), store, *flags, workdir=workdir).check_ok()
            assert len({event["run_id"] for event in run.events if event.get("run_id")}) == 1
            assert leftovers(run, runtime_base) == []
            found[name] = run
    return found
