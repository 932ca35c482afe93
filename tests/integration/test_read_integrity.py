"""Integrity on the read path of `mer-pipeline run`: corrupt payloads, NaN scales and read faults.

Each test runs the real CLI on a copy of a small synthetic store (2 MoE layers x 8 experts), damages
it as a failing disk or a bad conversion would (`tests/support/corrupt_data.py`), and checks the
exit status, the one line the user reads, the run's events, and (the leak guard of
`tests/conftest.py`) that no process, /dev/shm segment or runtime directory is left.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import numpy as np
import pytest

from mer.config import PipelineConfig
from mer.errors import RemoteError
from mer.store.verify import verify_store
from tests.support.corrupt_data import flip_byte, payload_place, write_nan_scale
from tests.support.io_service import run_io_service
from tests.support.pipeline_runs import RunningPipeline, run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

BAD_EXPERT = 11  # layer 1 expert 3 of the 2 x 8 test stores
BAD_NAME = "layer 1 expert 3 (id 11)"
UNIFORM = ("--workload", "uniform", "--cache-slots", 4, "--compute-workers", 1)


@pytest.fixture
def store_copy(pipeline_stores, tmp_path):
    """A copy of a session store by name, for a test to damage."""

    def copy(name: str = "tiny"):
        destination = tmp_path / f"store-{name}"
        shutil.copytree(pipeline_stores[name], destination)
        return destination

    return copy


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def computed_experts(events: list[dict]) -> set[int]:
    return {expert for event in events if event.get("event") == "compute_job" for expert in event["expert_ids"]}


def reads(events: list[dict]) -> list[dict]:
    return [event for event in events if event.get("event") == "expert_read"]


def wait_for_read_of(run: RunningPipeline, expert_id: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(event["expert_id"] == expert_id for event in reads(run.events())):
        assert run.process.poll() is None, f"the run ended before expert {expert_id} was read"
        assert time.monotonic() < deadline, f"expert {expert_id} not read within {timeout_s:g} s"
        time.sleep(0.02)


def test_a_flipped_byte_fails_the_run_naming_expert_file_and_offset(leak_guard, store_copy, tmp_path):
    store = store_copy()
    path, offset = flip_byte(store, BAD_EXPERT)
    result = run_pipeline(leak_guard, store, "--tokens", 300, *UNIFORM, workdir=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    line = last_line(result.stderr)
    assert line.startswith("mer-pipeline run: error: ") and "Traceback" not in result.stderr
    assert f"PayloadChecksumError: {BAD_NAME}: checksum mismatch in {path} at offset {offset} " in line, line
    events = result.events
    assert [event["expert_id"] for event in events if event.get("event") == "payload_check_failed"][:1] == [BAD_EXPERT]
    assert BAD_EXPERT not in computed_experts(events)  # never computed with
    assert BAD_EXPERT not in {event["expert_id"] for event in reads(events)}  # never counted as read
    assert computed_experts(events)  # the good experts before it were


@pytest.mark.parametrize("name", ["tiny", "q8"], ids=["q4_0", "q8_0"])
def test_a_nan_block_scale_fails_the_run_naming_layer_and_expert(leak_guard, store_copy, tmp_path, name):
    store = store_copy(name)
    write_nan_scale(store, BAD_EXPERT)
    assert verify_store(store).ok  # the checksums match: only the output shows it
    path, offset, _ = payload_place(store, BAD_EXPERT)
    result = run_pipeline(leak_guard, store, "--tokens", 300, *UNIFORM, workdir=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    line = last_line(result.stderr)
    assert f"NonFiniteError: {BAD_NAME}: its output holds NaN or inf (its payload in {path} at offset {offset} " in line
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr


def test_the_first_read_of_each_expert_is_checked_and_verify_reads_checks_every_read(leak_guard, pipeline_stores,
                                                                                   tmp_path):
    flags = ("--tokens", 60, "--no-prefetch", *UNIFORM)
    first_only = run_pipeline(leak_guard, pipeline_stores["tiny"], *flags, workdir=tmp_path).check_ok()
    every = run_pipeline(leak_guard, pipeline_stores["tiny"], *flags, "--verify-reads", workdir=tmp_path).check_ok()

    first_reads = reads(first_only.events)
    experts_read = {event["expert_id"] for event in first_reads}
    checked = [event["expert_id"] for event in first_reads if event["checked"]]
    assert sorted(checked) == sorted(experts_read)  # each expert once: its first read
    assert len(first_reads) == first_only.summary["reads"] > len(checked)  # re-reads were not checked
    (figures,) = first_only.events_named("payload_checks")
    assert figures["checks"] == len(checked) and figures["failures"] == 0 and not figures["every_read"]

    every_reads = reads(every.events)
    assert len(every_reads) == every.summary["reads"] == first_only.summary["reads"]  # same seed, same misses
    assert all(event["checked"] and event["check_us"] > 0 for event in every_reads)
    (figures,) = every.events_named("payload_checks")
    assert figures["checks"] == len(every_reads) and figures["every_read"]
    assert figures["nbytes"] == len(every_reads) * every.summary["bytes_per_expert"]


def test_with_verify_reads_a_payload_damaged_after_its_first_read_is_caught(leak_guard, store_copy, tmp_path):
    store = store_copy()
    run = RunningPipeline(leak_guard, store, "--tokens", 20_000, "--no-prefetch", "--verify-reads", *UNIFORM,
                          workdir=tmp_path)
    try:
        wait_for_read_of(run, BAD_EXPERT)
        path, offset = flip_byte(store, BAD_EXPERT)
        result = run.finish()
    finally:
        run.kill_if_running()
    assert result.returncode == 1 and result.stdout == ""
    assert f"{BAD_NAME}: checksum mismatch in {path} at offset {offset} " in last_line(result.stderr)
    good_reads = [event for event in reads(result.events) if event["expert_id"] == BAD_EXPERT]
    assert good_reads and all(event["checked"] for event in good_reads)  # read and checked before the damage


def test_injected_read_faults_are_retried_and_the_outputs_do_not_change(leak_guard, pipeline_stores, tmp_path,
                                                                       monkeypatch):
    flags = ("--tokens", 40, "--no-prefetch", *UNIFORM)
    clean = run_pipeline(leak_guard, pipeline_stores["tiny"], *flags, "--dump-outputs", tmp_path / "clean.npy",
                         workdir=tmp_path).check_ok()
    monkeypatch.setenv("MER_READ_FAULTS", f"{BAD_EXPERT}:2")  # the first two reads of the expert fail with EIO
    faulted = run_pipeline(leak_guard, pipeline_stores["tiny"], *flags, "--dump-outputs", tmp_path / "faulted.npy",
                           workdir=tmp_path).check_ok()
    np.testing.assert_array_equal(np.load(tmp_path / "faulted.npy"), np.load(tmp_path / "clean.npy"))
    retries = faulted.events_named("expert_read_retry")
    assert [(event["expert_id"], event["attempt"], event["delay_ms"]) for event in retries] == [
        (BAD_EXPERT, 1, 10.0), (BAD_EXPERT, 2, 50.0)]
    assert "[Errno 5] Input/output error (injected: MER_READ_FAULTS)" in retries[0]["error"]
    first = next(event for event in reads(faulted.events) if event["expert_id"] == BAD_EXPERT)
    assert first["attempts"] == 3 and first["checked"]
    assert clean.summary["reads"] == faulted.summary["reads"]
    assert clean.events_named("expert_read_retry") == []


def test_a_read_that_keeps_failing_fails_the_run_naming_expert_and_file(leak_guard, pipeline_stores, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("MER_READ_FAULTS", f"{BAD_EXPERT}:4")  # more than the 3 retries
    path, offset, _ = payload_place(pipeline_stores["tiny"], BAD_EXPERT)
    result = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 300, *UNIFORM, workdir=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    line = last_line(result.stderr)
    assert re.search(rf"IoReadError: {re.escape(BAD_NAME)}: {re.escape(str(path))}: read of \d+ bytes at offset "
                     rf"{offset} failed: \[Errno 5\] Input/output error \(injected: MER_READ_FAULTS\) "
                     r"\(tried 4 times over 0\.31 s\)$", line), line
    assert len(result.events_named("expert_read_retry")) == 3
    assert BAD_EXPERT not in computed_experts(result.events)


def test_an_acquire_failing_on_one_miss_releases_the_leases_of_its_other_misses(leak_guard, store_copy, tmp_path,
                                                                                monkeypatch):
    """The I/O worker in process, asked by the router's client for a corrupt expert (its check fails at
    once) and a good one whose read is retried twice (so it ends after the failure): the good one's
    lease, which the router never gets, is released, so its slot is a hit afterwards, not leaked."""
    store = store_copy()
    flip_byte(store, BAD_EXPERT)
    good = 3
    monkeypatch.setenv("MER_READ_FAULTS", f"{good}:2")
    config = PipelineConfig(store=store, cache_slots=4, compute_workers=1, prefetch=False)

    async def scenario(service, client) -> list[str]:
        with pytest.raises(RemoteError, match=re.escape(f"PayloadChecksumError: {BAD_NAME}: checksum mismatch")):
            await client.acquire(0, [good, BAD_EXPERT])
        await asyncio.sleep(0.5)  # the good read ends after its two retries (10 + 50 ms)
        states = [info.state.value for info in service.table.slot_infos()]
        (grant,) = await client.acquire(1, [good])
        await client.release([grant.ref])
        return states + [f"hit={grant.hit}"]

    states = run_io_service(leak_guard, config, tmp_path, scenario)
    assert "leased" not in states and "loading" not in states and states.count("ready") == 1, states
    assert states[-1] == "hit=True"
