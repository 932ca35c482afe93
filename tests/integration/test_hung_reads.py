"""A read that hangs mid-run: `run` and `generate` end within the read deadline plus a bound, exit 1,
with one line naming the expert, the file and the offset; the slot under the read is quarantined.

A hung device cannot be made here: dm-delay and dm-flakey need device-mapper, which the test
machines do not have. `MER_READ_FAULTS=hang:ID` stands in for it: the I/O worker's reader counts the
read of expert ID as in flight but never hands it to the kernel or a thread, so it never completes
and cannot be cancelled, as a read stuck in a device that does not answer (the reader in a disk
wait, which the stall watch counts as progress). Every test checks (the leak guard of
`tests/conftest.py`) that no process, /dev/shm segment or runtime directory is left.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from mer.config import PipelineConfig
from mer.errors import RemoteError
from mer.io.service import IoService
from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from mer.router.io_client import IoClient
from mer.store.demo import converted_store
from mer.store.manifest import Manifest
from tests.support.corrupt_data import payload_place
from tests.support.generate_runs import run_generate
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.host import requires_io_uring
from tests.support.io_service import run_io_service
from tests.support.pipeline_runs import run_pipeline
from tests.support.serve_runs import ServerRun

HUNG_EXPERT = 11  # layer 1 expert 3 of the 2 x 8 test stores
HUNG_NAME = "layer 1 expert 3 (id 11)"
DEADLINE_S = 1.0
END_BOUND_S = 8.0  # from the deadline to the command's exit: the graph's shutdown on a loaded 2-core machine
INJECTED = "cancel ignored (an injected hang: MER_READ_FAULTS)"


def hung_line_pattern(name: str, path, offset: int) -> str:
    return (rf"IoReadHungError: {re.escape(name)}: {re.escape(str(path))}: read of \d+ bytes at offset {offset} hung: "
            rf"no completion within {DEADLINE_S:g} s \(read_deadline_s\): the device does not answer; "
            rf"{re.escape(INJECTED)}$")


def check_ended_in_time(result, hung: dict, ended: float) -> None:
    """The command ended within the deadline plus END_BOUND_S of the hung read's start (monotonic clock,
    the same in every process of the machine)."""
    read_started = hung["t_mono"] - hung["seconds"]
    print(f"the read hung {hung['seconds']:.3f} s; the command ended {ended - read_started:.2f} s after it started")
    assert DEADLINE_S <= hung["seconds"] < DEADLINE_S + 1.0, hung
    assert ended - read_started < DEADLINE_S + END_BOUND_S, (ended - read_started, result.stderr)


@pytest.mark.slow  # starts the process graph
@pytest.mark.parametrize("backend", [pytest.param("uring", marks=requires_io_uring), "preadv"])
def test_a_hung_read_ends_the_run_within_the_deadline_naming_expert_file_and_offset(leak_guard, pipeline_stores,
                                                                                    tmp_path, monkeypatch, backend):
    store = pipeline_stores["tiny"]
    path, offset, _ = payload_place(store, HUNG_EXPERT)
    monkeypatch.setenv("MER_READ_FAULTS", f"hang:{HUNG_EXPERT}")
    result = run_pipeline(leak_guard, store, "--tokens", 300, "--workload", "uniform", "--cache-slots", 4,
                          "--compute-workers", 1, "--io-backend", backend, "--read-deadline-s", DEADLINE_S,
                          workdir=tmp_path)
    ended = time.monotonic()
    assert result.returncode == 1 and result.stdout == "", result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mer-pipeline run: error: ") and "Traceback" not in result.stderr
    assert re.search(hung_line_pattern(HUNG_NAME, path, offset), line), line
    (hung,) = result.events_named("read_hung")
    assert (hung["expert_id"], hung["file"], hung["offset"], hung["read_deadline_s"]) == (
        HUNG_EXPERT, str(path), offset, DEADLINE_S)
    (quarantined,) = result.events_named("slot_quarantined")
    assert (quarantined["slot"], quarantined["expert_id"], quarantined["quarantined"]) == (hung["slot"], HUNG_EXPERT, 1)
    assert result.events_named("expert_read_retry") == []  # not retried on the same device
    (backend_event,) = [event for event in result.events_named("io_backend_selected")]
    assert backend_event["backend"] == backend
    assert HUNG_EXPERT not in {event["expert_id"] for event in result.events_named("expert_read")}
    check_ended_in_time(result, hung, ended)


@pytest.mark.slow  # starts the process graph
def test_a_hung_read_ends_generate_within_the_deadline_naming_expert_file_and_offset(leak_guard, tmp_path,
                                                                                     monkeypatch):
    cache_dir = tmp_path / "cache"
    model = write_tiny_moe_gguf(tmp_path / "model.gguf", arch="llama", dtypes=("q8_0",) * 3, n_layers=2, n_experts=8,
                                top_k=2, d_model=64, d_ff=128, vocab_size=384, seed=4).path
    monkeypatch.setenv("MER_CACHE_DIR", str(cache_dir))
    store = converted_store(model)  # the store generate converts the model into, made here to find the file
    manifest = Manifest.load(store)
    hung_expert = manifest.geometry.experts_per_layer + 2  # layer 1 expert 2: read before 200 tokens are out
    path, offset, _ = payload_place(store, hung_expert)
    monkeypatch.setenv("MER_READ_FAULTS", f"hang:{hung_expert}")
    result = run_generate(leak_guard, model, "--prompt-tokens", "17,200,5,33,99", "-n", 200, "--ignore-eos",
                          "--cache-slots", 2, "--compute-workers", 1, "--read-deadline-s", DEADLINE_S,
                          workdir=tmp_path, cache_dir=cache_dir)
    ended = time.monotonic()
    assert result.returncode == 1 and result.stdout == "", result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mer-pipeline generate: error: ") and "Traceback" not in result.stderr
    assert re.search(hung_line_pattern(manifest.describe(hung_expert), path, offset), line), line
    (hung,) = result.events_named("read_hung")
    assert (hung["expert_id"], hung["file"], hung["offset"]) == (hung_expert, str(path), offset)
    check_ended_in_time(result, hung, ended)


def io_config(store: Path, num_slots: int) -> PipelineConfig:
    return PipelineConfig(store=store, cache_slots=num_slots, compute_workers=1, prefetch=False, read_deadline_s=0.3)


def slot_states(service: IoService) -> list[str]:
    return [info.state.value for info in service.table.slot_infos()]


async def acquire_hung(client: IoClient) -> None:
    with pytest.raises(RemoteError, match=re.escape(f"IoReadHungError: {HUNG_NAME}: ")) as caught:
        await client.acquire(0, [HUNG_EXPERT])
    assert "hung: no completion within 0.3 s (read_deadline_s)" in str(caught.value)


def test_the_slot_of_a_hung_read_is_quarantined_and_never_handed_out(leak_guard, pipeline_stores, tmp_path,
                                                                     monkeypatch):
    """The I/O worker in process, asked by the router's client: the hung read's Acquire fails naming the
    expert; its slot is never granted again while the read could still land in it, the expert itself is
    read into another slot by its next Acquire, and an Acquire of more experts than the slots left in
    service is refused instead of waiting forever."""
    monkeypatch.setenv("MER_READ_FAULTS", f"hang:{HUNG_EXPERT}")

    async def scenario(service: IoService, client: IoClient):
        await acquire_hung(client)
        (quarantined,) = [slot for slot, state in enumerate(slot_states(service)) if state == "quarantined"]
        granted = []
        for token, expert in enumerate([0, 1, 2, 3, 4, 0, 5, 6, 1, 7, 8, 2], start=1):  # evicting misses, hits
            (grant,) = await client.acquire(token, [expert])
            granted.append(grant.slot)
            await client.release([grant.ref])
        again = await client.acquire(20, [HUNG_EXPERT, 9])  # the hang was injected once: read again, elsewhere
        granted += [grant.slot for grant in again]
        await client.release([grant.ref for grant in again])
        refused = r"SlotsQuarantinedError: Acquire: 4 experts, more than the 3 slots left that pins cannot hold: "
        with pytest.raises(RemoteError, match=refused + r"1 of 4 slots are quarantined under reads that hang"):
            await client.acquire(21, [0, 1, 2, 3])
        return quarantined, granted, slot_states(service)

    quarantined, granted, states = run_io_service(leak_guard, io_config(pipeline_stores["tiny"], 4), tmp_path, scenario)
    assert quarantined not in granted and len(set(granted)) == 3, (quarantined, granted)
    assert states[quarantined] == "quarantined" and "leased" not in states and "loading" not in states, states


def test_a_quarantined_slot_serves_again_once_the_late_read_has_ended(leak_guard, pipeline_stores, tmp_path,
                                                                      monkeypatch):
    """The device answers 1 s after the read started (0.7 s after its deadline): until then the slot is
    quarantined; once the read has ended in the kernel the slot is FREE and granted again."""
    monkeypatch.setenv("MER_READ_FAULTS", f"hang:{HUNG_EXPERT}:1:1.0")

    async def scenario(service: IoService, client: IoClient):
        await acquire_hung(client)
        quarantined = slot_states(service).index("quarantined")
        with pytest.raises(RemoteError, match="SlotsQuarantinedError: Acquire: 4 experts"):
            await client.acquire(1, [0, 1, 2, 3])
        deadline = time.monotonic() + 10.0
        while "quarantined" in slot_states(service):
            assert time.monotonic() < deadline, "the quarantine was not lifted within 10 s"
            await asyncio.sleep(0.05)
        grants = await client.acquire(2, [0, 1, 2, 3])  # every slot in service again
        await client.release([grant.ref for grant in grants])
        return quarantined, [grant.slot for grant in grants]

    quarantined, granted = run_io_service(leak_guard, io_config(pipeline_stores["tiny"], 4), tmp_path, scenario)
    assert quarantined in granted and sorted(granted) == [0, 1, 2, 3]


@pytest.mark.slow  # starts the process graph and a server
def test_a_hung_read_fails_the_requests_of_its_step_and_the_server_goes_on(tmp_path, monkeypatch):
    """`serve` on the embedded model: the first request's prefill needs an expert whose read hangs; that
    request ends with an error naming the expert, the file and the offset, and the next request (the same
    prompt: the expert is read again, into another slot) gets the tokens of mer's single-process generation."""
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    prompt = tokenizer.encode("def ")
    experts = GGUFExperts(model.source)
    routings = forward(model, prompt, model.new_kv_cache(len(prompt)), experts).routings
    first_block = min(routings)
    moe_layer, expert = model.moe_layers[first_block], int(routings[first_block].experts[0][0])
    hung_expert = moe_layer * model.hparams.num_experts + expert
    expected = generate(model, prompt, 8, Sampler(), experts, ignore_eos=True,
                        end_ids=tokenizer.end_of_generation_ids).tokens
    monkeypatch.setenv("MER_READ_FAULTS", f"hang:{hung_expert}")
    server = ServerRun.start(tmp_path, "--read-deadline-s", DEADLINE_S, "--compute-workers", 1,
                             cache_dir=tmp_path / "cache")
    try:
        body = {"model": "tiny-moe-q8_0", "prompt": "def ", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        status, failed = server.post("/v1/completions", body)
        status_after, served = server.post("/v1/completions", body)
        (hung,) = server.events_named("read_hung")
        (step_failed,) = server.events_named("serve_step_failed")
    finally:
        run_ids = server.run_ids()
        code = server.stop(signal.SIGTERM)
    assert code == 143, "".join(server.stderr_lines)
    assert run_ids and not server.leftovers(run_ids)
    path, offset, _ = payload_place(Path(hung["file"]).parent, hung_expert)
    assert hung["expert_id"] == hung_expert and (hung["file"], hung["offset"]) == (str(path), offset)
    assert status == 500, failed
    message = failed["error"]["message"]
    name = f"layer {moe_layer} expert {expert} (id {hung_expert})"
    assert re.search(rf"^the router could not serve the request: {re.escape(name)}: {re.escape(str(path))}: read of "
                     rf"\d+ bytes at offset {offset} hung: no completion within {DEADLINE_S:g} s", message), message
    assert step_failed["error_type"] == "mer.errors.IoReadHungError" and len(step_failed["request_ids"]) == 1
    assert status_after == 200, served
    assert served["choices"][0]["text"] == tokenizer.decode(expected)
    assert served["usage"]["completion_tokens"] == 8
