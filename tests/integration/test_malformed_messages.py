"""Malformed messages to every socket of the graph: the receiver logs each one, answers it with an
`ErrorReply` where the socket type can answer, and keeps serving (docs/reliability.md).

Two kinds of tests, all on real ZeroMQ ipc sockets:

- in process, one receive loop against sockets the test holds (the router's I/O and compute
  clients, a compute worker's job loop, a child's control listener): the hand-made malformed
  variants of `tests/support/malformed_frames.py`, then hypothesis (random and mutated frames,
  `deadline=None`, a few dozen examples), then a valid exchange that must still work;
- a real `mer-pipeline generate` on the embedded tiny model, its five bound sockets (`control`,
  `io`, `compute`, `observe`, `predictor_progress`) fed malformed and stray messages from outside
  while it generates: it ends with exit 0 and the very tokens of mer's single-process generation,
  every bad message is in the log, and nothing of the run is left;
- the same generation fuzzed by hypothesis on the four receivers that only a live graph has (the I/O
  worker's `io`, the supervisor's `control`, the predictor's `observe`, the router's
  `predictor_progress`): 40 examples each, every one logged, answered on `io` and `control`, and the
  same exit 0 and tokens.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import structlog.testing
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings

from mer.compute.batches import pack_batches
from mer.compute.worker import ComputeWorker
from mer.protocol import (
    UNKNOWN_REQUEST_ID, Acquire, ChildFailed, ComputeItem, ErrorReply, ExpertBatchJob, ExpertBatchResult, Heartbeat,
    Hello, HiddenObserved, IoStats, JobDone, PinSet, PredictorProgress, PredictorStats, PrefetchHint, PrefetchHints,
    Ready, Release, RoutingObserved, Shutdown, SliceRange, SlotGrant, SlotRef, SlotsReady, StartBenchmark,
    StatsRequest, TokenGenerated, decode, encode,
)
from mer.router.compute_client import ComputeClient
from mer.router.io_client import IoClient
from mer.runtime.child import _listen_control
from mer.runtime.paths import runtime_base_dir
from tests.support.embedded_model import embedded_geometry
from tests.support.generate_runs import GENERATE_TIMEOUT_S
from tests.support.malformed_frames import (
    hypothesis_frames, hypothesis_malformed_frames, malformed_variants,
)
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, read_json_lines, run_ids_in_log

FUZZ = settings(deadline=None, max_examples=25, suppress_health_check=list(HealthCheck), derandomize=True)
RECEIVE_TIMEOUT_S = 10.0


def warnings_named(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry.get("event") == name]


def open_socket(context: zmq.Context, kind: int, endpoint: str, *, bind: bool = False, identity: bytes | None = None):
    """A socket of `kind` with no linger, bound to or connected to `endpoint`, with `identity` if given."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        socket.setsockopt(zmq.IDENTITY, identity)
    (socket.bind if bind else socket.connect)(endpoint)
    return socket


async def receive(socket: zmq.asyncio.Socket, timeout_s: float = RECEIVE_TIMEOUT_S) -> list[bytes]:
    return await asyncio.wait_for(socket.recv_multipart(), timeout_s)


# ---- the router's I/O client: replies from the I/O worker ------------------------------------------


def run_io_client(tmp_path: Path, fuzz_frames: list[list[bytes]]) -> tuple[list[SlotGrant], list[dict]]:
    """An IoClient against a fake I/O worker (a ROUTER): between the two parts of the answer to the
    client's acquire (the hit, then the miss) the fake sends `fuzz_frames`, a reply for an unknown
    request id and an ErrorReply for no request. Returns the grants the acquire got and the captured logs."""

    async def main():
        context = zmq.asyncio.Context()
        endpoint = f"ipc://{tmp_path}/io.sock"
        fake_io = open_socket(context, zmq.ROUTER, endpoint, bind=True)
        client = IoClient(context, endpoint)
        try:
            acquiring = asyncio.create_task(client.acquire(7, [5, 6]))
            identity, *frames = await receive(fake_io)
            request = decode(frames, expected_kinds=(Acquire,))
            hit, miss = SlotGrant(5, 0, 1, True, 0.0, False), SlotGrant(6, 1, 1, False, 12.0, False)
            await fake_io.send_multipart([identity, *encode(SlotsReady(request.request_id, [hit], False))])
            for frames in [*fuzz_frames, encode(SlotsReady(request.request_id + 100, [], True)),
                           encode(ErrorReply(UNKNOWN_REQUEST_ID, "ProtocolError", "bad", ""))]:
                await fake_io.send_multipart([identity, *frames])
            await fake_io.send_multipart([identity, *encode(SlotsReady(request.request_id, [miss], True))])
            return await asyncio.wait_for(acquiring, RECEIVE_TIMEOUT_S)
        finally:
            client.close()
            fake_io.close(linger=0)
            context.term()

    with structlog.testing.capture_logs() as logs:
        grants = asyncio.run(main())
    return grants, logs


def test_the_io_client_drops_malformed_and_unknown_replies_and_keeps_serving(tmp_path):
    variants = malformed_variants(SlotsReady(3, [SlotGrant(5, 1, 2, True, 0.0, False)], False), seed=1)
    grants, logs = run_io_client(tmp_path, [frames for _, frames in variants])
    assert [grant.expert_id for grant in grants] == [5, 6]
    bad = warnings_named(logs, "bad_reply")
    assert len(bad) == len(variants) + 2, [entry["error"] for entry in bad]
    assert all(entry["peer"] == "I/O worker" for entry in bad)
    assert "which no request is waiting for" in bad[-2]["error"] and "which no request is waiting for" in bad[-1]["error"]


@FUZZ
@given(frames=hypothesis_frames([SlotsReady(1000, [SlotGrant(5, 1, 2, True, 0.0, False)], False), StatsRequest(1000)]))
def test_the_io_client_survives_fuzzed_replies(tmp_path_factory, frames):
    grants, logs = run_io_client(tmp_path_factory.mktemp("io"), [frames])
    assert [grant.expert_id for grant in grants] == [5, 6]
    assert len(warnings_named(logs, "bad_reply")) == 3  # the fuzzed frames, the unknown id, the ErrorReply


# ---- the router's compute client: replies from the compute workers -------------------------------------


def run_compute_client(tmp_path: Path, fuzz_frames: list[list[bytes]]) -> tuple[np.ndarray, list[dict]]:
    """A ComputeClient with one fake worker that holds its job while an intruder (identity `compute-7`,
    beyond the one worker) sends `fuzz_frames`, a Hello and a result for the very job in flight; then
    the worker answers. Returns the partials and the captured logs."""

    async def main():
        context = zmq.asyncio.Context()
        endpoint = f"ipc://{tmp_path}/compute.sock"
        client = ComputeClient(context, endpoint, 1)
        sockets = [open_socket(context, zmq.DEALER, endpoint, identity=identity)
                   for identity in (b"compute-0", b"compute-7")]
        worker, intruder = sockets
        try:
            await worker.send_multipart(encode(Hello("compute-0", 1)))
            await client.wait_connected(RECEIVE_TIMEOUT_S)
            packed = pack_batches({3: np.ones((1, 4), np.float32)})
            computing = asyncio.create_task(client.compute_batches([ComputeItem(3, 0, 1, 0)], [SliceRange(0, 32)],
                                                                   packed))
            job = decode(await receive(worker), expected_kinds=(ExpertBatchJob,))
            forged = ExpertBatchResult(job.job_id, 0, np.full((1, 1, 4), 666.0, np.float32), 1.0)
            for frames in [*fuzz_frames, encode(Hello("compute-7", 2)), encode(forged)]:
                await intruder.send_multipart(frames)
            await intruder.send_multipart(encode(StatsRequest(1)))  # a marker: every frame before it is received
            await asyncio.sleep(0.05)
            await worker.send_multipart(encode(ExpertBatchResult(job.job_id, 0, np.full((1, 1, 4), 2.0, np.float32),
                                                                 1.0)))
            return await asyncio.wait_for(computing, RECEIVE_TIMEOUT_S)
        finally:
            for socket in sockets:
                socket.close(linger=0)
            client.close()
            context.term()

    with structlog.testing.capture_logs() as logs:
        partials = asyncio.run(main())
    return partials, logs


def test_the_compute_client_drops_malformed_replies_and_results_from_a_worker_not_sent_the_job(tmp_path):
    job_result = ExpertBatchResult(1, 0, np.zeros((1, 1, 4), np.float32), 1.0)
    variants = malformed_variants(job_result, seed=2)
    partials, logs = run_compute_client(tmp_path, [frames for _, frames in variants])
    np.testing.assert_array_equal(partials, np.full((1, 1, 4), 2.0, np.float32))  # not the forged 666
    errors = [entry["error"] for entry in warnings_named(logs, "bad_reply")]
    assert len(errors) == len(variants) + 3, errors  # + the Hello, the forged result, the marker
    assert "there are only 1 compute workers" in errors[-3]
    assert "from b'compute-7', which was not sent that job" in errors[-2]


@FUZZ
@given(frames=hypothesis_frames([ExpertBatchResult(1, 0, np.zeros((1, 1, 4), np.float32), 1.0),
                                 ErrorReply(1, "ValueError", "x", "")]))
def test_the_compute_client_survives_fuzzed_replies(tmp_path_factory, frames):
    partials, logs = run_compute_client(tmp_path_factory.mktemp("compute"), [frames])
    np.testing.assert_array_equal(partials, np.full((1, 1, 4), 2.0, np.float32))
    assert len(warnings_named(logs, "bad_reply")) == 4


# ---- a compute worker's job loop ---------------------------------------------------------------------------


class ListLog:
    def __init__(self):
        self.entries: list[dict] = []

    def warning(self, event, **fields):
        self.entries.append({"event": event, **fields})

    info = error = warning


def run_compute_worker(tmp_path: Path, store: Path, fuzz_frames: list[list[bytes]]) -> tuple[list, ListLog]:
    """A real ComputeWorker's `serve` on its DEALER, fed by a test ROUTER: `fuzz_frames`, then a valid
    job with no items (it needs no arena). Returns the decoded replies and the worker's log."""
    log = ListLog()

    async def main():
        context = zmq.asyncio.Context()
        endpoint = f"ipc://{tmp_path}/compute.sock"
        router = open_socket(context, zmq.ROUTER, endpoint, bind=True)
        run = SimpleNamespace(store=str(store), endpoint=lambda name: endpoint)
        worker = ComputeWorker(SimpleNamespace(index=0, run=run, log=log, zmq=context,
                                               config=SimpleNamespace(kernel_threads=1)))
        worker.socket = open_socket(context, zmq.DEALER, endpoint, identity=b"compute-0")
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop))
        try:
            await worker.socket.send_multipart(encode(Hello("compute-0", 1)))
            identity, *_ = await receive(router)
            replies = []
            valid = ExpertBatchJob(41, [], [SliceRange(0, 32)], np.zeros((0, 8), np.float32), [0])
            for frames in [*fuzz_frames, encode(valid)]:
                await router.send_multipart([identity, *frames])
                _, *reply = await receive(router)
                replies.append(decode(reply, expected_kinds=(ExpertBatchResult, ErrorReply)))
            return replies
        finally:
            stop.set()
            await asyncio.wait_for(serving, RECEIVE_TIMEOUT_S)
            worker.close()
            router.close(linger=0)
            context.term()

    return asyncio.run(main()), log


def test_a_compute_worker_answers_every_malformed_job_with_an_error_and_keeps_serving(tmp_path, pipeline_stores):
    job = ExpertBatchJob(9, [], [SliceRange(0, 32)], np.zeros((0, 8), np.float32), [0])
    variants = malformed_variants(job, seed=3)
    replies, log = run_compute_worker(tmp_path, pipeline_stores["tiny"], [frames for _, frames in variants])
    *errors, result = replies
    assert all(isinstance(reply, ErrorReply) and reply.request_id == UNKNOWN_REQUEST_ID for reply in errors)
    assert isinstance(result, ExpertBatchResult) and result.job_id == 41 and result.partials.shape == (1, 0, 8)
    assert len(warnings_named(log.entries, "compute_job_failed")) == len(variants)


@FUZZ
@given(frames=hypothesis_frames([ExpertBatchJob(9, [], [SliceRange(0, 32)], np.zeros((0, 8), np.float32), [0])]))
def test_a_compute_worker_survives_fuzzed_jobs(tmp_path_factory, pipeline_stores, frames):
    replies, _ = run_compute_worker(tmp_path_factory.mktemp("worker"), pipeline_stores["tiny"], [frames])
    assert len(replies) == 2 and isinstance(replies[-1], ExpertBatchResult) and replies[-1].job_id == 41


# ---- a child's control listener ---------------------------------------------------------------------------


class RefusingRole:
    """A role whose `on_control` fails on a StartBenchmark (it cannot take it) and records the rest."""

    def __init__(self):
        self.received = []

    async def on_control(self, message):
        if isinstance(message, StartBenchmark):
            raise RuntimeError("this role runs no benchmark")
        self.received.append(message)


def run_control_listener(tmp_path: Path, fuzz_frames: list[list[bytes]]) -> tuple[RefusingRole, list[dict]]:
    """`_listen_control` on a child's DEALER fed by a test supervisor (a ROUTER): `fuzz_frames`, a
    message the role refuses, an ErrorReply, a message the role takes, then Shutdown, which must stop it."""
    role = RefusingRole()

    async def main():
        context = zmq.asyncio.Context()
        endpoint = f"ipc://{tmp_path}/control.sock"
        supervisor = open_socket(context, zmq.ROUTER, endpoint, bind=True)
        control = open_socket(context, zmq.DEALER, endpoint, identity=b"mer-io-0badc0de")
        stop = asyncio.Event()
        listening = asyncio.create_task(_listen_control(control, role, stop))
        try:
            await control.send_multipart(encode(Hello("mer-io-0badc0de", 1)))
            identity, *_ = await receive(supervisor)
            for frames in [*fuzz_frames, encode(StartBenchmark()),
                           encode(ErrorReply(UNKNOWN_REQUEST_ID, "ProtocolError", "refused", "")),
                           encode(JobDone({"taken": True}))]:
                await supervisor.send_multipart([identity, *frames])
            await supervisor.send_multipart([identity, *encode(Shutdown("test over"))])
            await asyncio.wait_for(stop.wait(), RECEIVE_TIMEOUT_S)
            assert not listening.done()
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            control.close(linger=0)
            supervisor.close(linger=0)
            context.term()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    return role, logs


def test_a_child_control_listener_logs_malformed_and_refused_messages_and_keeps_listening(tmp_path):
    variants = malformed_variants(Shutdown("please"), seed=4)
    role, logs = run_control_listener(tmp_path, [frames for _, frames in variants])
    assert role.received == [JobDone({"taken": True})]
    assert len(warnings_named(logs, "bad_control_message")) == len(variants) + 1  # + the StartBenchmark refused
    (refused,) = warnings_named(logs, "control_message_refused")
    assert refused["error"] == "refused"


@FUZZ
@given(frames=hypothesis_frames([Shutdown("please"), JobDone({"a": 1})]))
def test_a_child_control_listener_survives_fuzzed_messages(tmp_path_factory, frames):
    role, _ = run_control_listener(tmp_path_factory.mktemp("control"), [frames])
    assert role.received[-1] == JobDone({"taken": True})


# ---- the whole graph: a generation fed malformed messages from outside ------------------------------------

PROMPT = "def "
STEPS = 200  # ~4 s of decode on two busy cores: the fuzzing below takes well under a second


def stray_messages(run_id: str) -> dict[str, list[tuple[str, list[bytes]]]]:
    """By socket: (name, frames) of what an intruder sends. Nothing here may be acted on: malformed
    frames, well-formed messages naming experts the store does not have, and (on `control`) a
    well-formed Hello, Ready, JobDone or TokenGenerated from an identity that is not a child."""
    io_kinds = (Acquire, Release, PrefetchHints, StatsRequest)
    return {
        "io": [*malformed_variants(Acquire(5, 0, [1, 2]), seed=11, expected_kinds=io_kinds),
               *malformed_variants(Release([SlotRef(0, 1, 1)]), seed=12, flips=1, expected_kinds=io_kinds),
               ("an Acquire of unknown experts", encode(Acquire(901, 0, [10_000, -1]))),
               ("hints of unknown experts", encode(PrefetchHints(0, [PrefetchHint(10_000, 1.0)], "markov")))],
        "compute": [*malformed_variants(ExpertBatchResult(1, 0, np.zeros((1, 1, 8), np.float32), 1.0), seed=13),
                    ("a Hello from a worker that does not exist", encode(Hello("compute-9", 1))),
                    ("a result for a job sent to no one", encode(ExpertBatchResult(10**9, 0, np.zeros((1, 1, 8),
                                                                                              np.float32), 1.0))),
                    ("a result for a job sent to another worker", encode(ExpertBatchResult(3, 0, np.zeros((1, 1, 8),
                                                                                              np.float32), 1.0)))],
        "observe": [*malformed_variants(RoutingObserved(0, 0, [1, 2], [0.5, 0.5]), seed=14),
                    ("a decision of unknown experts", encode(RoutingObserved(0, 0, [10_000, 3], [0.5, 0.5])))],
        "predictor_progress": malformed_variants(PredictorProgress(1, 1), seed=16,
                                                 expected_kinds=(PredictorProgress,)),
        "control": [*malformed_variants(Hello("x", 1), seed=15),
                    ("a Hello from a stranger naming a child", encode(Hello(f"mer-io-{run_id}", 1))),
                    ("a Ready from a stranger", encode(Ready("intruder", 1, {}))),
                    ("a TokenGenerated from a stranger", encode(TokenGenerated(0, 0))),
                    ("a JobDone from a stranger", encode(JobDone({"tokens": []})))],
    }


def feed_the_graph(runtime_dir: Path, messages: dict[str, list[tuple[str, list[bytes]]]]) -> dict[str, list]:
    """Send `messages` to the run's sockets from intruders; the decoded answers on `io` and `control`
    (the I/O worker is then asked for its stats, which it must still answer)."""
    context = zmq.Context()
    sockets = {name: open_socket(context, kind, f"ipc://{runtime_dir}/{name}.sock", identity=identity)
               for name, kind, identity in [("io", zmq.DEALER, b"intruder"), ("compute", zmq.DEALER, b"compute-9"),
                                            ("observe", zmq.PUSH, None), ("predictor_progress", zmq.PUSH, None),
                                            ("control", zmq.DEALER, b"intruder")]}
    try:
        for socket in sockets.values():
            socket.setsockopt(zmq.RCVTIMEO, int(RECEIVE_TIMEOUT_S * 1000))
        for name, socket in sockets.items():
            for _, frames in messages[name]:
                socket.send_multipart(frames)
        answers = {"io": [], "control": []}
        for name in answers:
            for _ in messages[name]:
                answers[name].append(decode(sockets[name].recv_multipart(), expected_kinds=(ErrorReply,)))
        sockets["io"].send_multipart(encode(StatsRequest(77)))
        answers["io"].append(decode(sockets["io"].recv_multipart(), expected_kinds=(IoStats,)))
        return answers
    finally:
        for socket in sockets.values():
            socket.close(linger=0)
        context.term()


def wait_for_first_token(process: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + GENERATE_TIMEOUT_S
    while True:
        events = read_json_lines(log_path)
        if any(event.get("event") == "generation_token" for event in events):
            (run_id,) = {str(event["run_id"]) for event in events if event.get("event") == "run_started_supervisor"}
            return run_id
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no generated token within {GENERATE_TIMEOUT_S:g} s"
        time.sleep(0.02)


@functools.cache
def reference_tokens(steps: int) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of mer's single-process greedy generation of the embedded model."""
    from mer.model.experts import GGUFExperts
    from mer.model.generate import generate
    from mer.model.model import MoEModel
    from mer.model.sampling import Sampler
    from mer.model.tokenizer import load_tokenizer
    from mer.models import tiny_model_path

    model = MoEModel.load(tiny_model_path())
    prompt = load_tokenizer(model.source.parts[0]).encode(PROMPT)
    return prompt, generate(model, prompt, steps, Sampler(), GGUFExperts(model.source), ignore_eos=True).tokens


def start_generation(leak_guard, tmp_path: Path, log_path: Path) -> subprocess.Popen:
    """A `mer-pipeline generate` of STEPS tokens on the embedded model, registered with the leak guard."""
    argv = [MER_PIPELINE, "generate", "--prompt", PROMPT, "-n", str(STEPS), "--ignore-eos", "--json",
            "--log-file", str(log_path), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")})
    leak_guard.add_supervisor_pid(process.pid)
    return process


def disturb_generation(leak_guard, tmp_path: Path, disturb) -> tuple[subprocess.Popen, str, list[dict], object]:
    """Start a generation, call `disturb(process, runtime_dir, run_id)` after its first token, wait for its
    end and check its tokens are mer's single-process ones. Returns the process, its stderr, its log events and
    what `disturb` returned."""
    log_path = tmp_path / "generate.jsonl"
    process = start_generation(leak_guard, tmp_path, log_path)
    try:
        run_id = wait_for_first_token(process, log_path)
        leak_guard.add_run(run_id)
        disturbed = disturb(process, runtime_base_dir() / f"mer-{run_id}", run_id)
        stdout, stderr = process.communicate(timeout=GENERATE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for found in run_ids_in_log(log_path):
            leak_guard.add_run(found)

    assert process.returncode == 0, stderr
    prompt, expected = reference_tokens(STEPS)
    result = json.loads(stdout)
    assert result["prompt_tokens"] == prompt and result["tokens"] == expected
    return process, stderr, read_json_lines(log_path), disturbed


@pytest.mark.slow
def test_every_socket_of_a_running_generation_survives_malformed_and_stray_messages(leak_guard, tmp_path):
    messages = {}

    def feed(process, runtime_dir: Path, run_id: str) -> dict[str, list]:
        messages.update(stray_messages(run_id))
        return feed_the_graph(runtime_dir, messages)

    _, _, events, answers = disturb_generation(leak_guard, tmp_path, feed)

    *io_errors, io_stats = answers["io"]
    assert isinstance(io_stats, IoStats) and io_stats.request_id == 77
    assert len(io_errors) == len(messages["io"])
    assert [error.request_id for error in io_errors[-2:]] == [901, UNKNOWN_REQUEST_ID]  # the Acquire's own id
    layers, experts_per_layer, _ = embedded_geometry()  # the generation's model: its store's expert ids
    experts = layers * experts_per_layer
    assert f"Acquire: expert ids [10000, -1] are not in 0..{experts - 1}" in io_errors[-2].message
    assert all(error.request_id == UNKNOWN_REQUEST_ID for error in answers["control"])
    assert "not a child of this run" in answers["control"][-1].message

    logged = logged_bad_messages(events)
    assert len(logged["bad_io_message"]) == len(messages["io"])
    assert all(event["peer"] == "intruder" for event in logged["bad_io_message"])
    assert len([event for event in logged["bad_reply"] if event["peer"] == "compute"]) == len(messages["compute"])
    assert len([event for event in logged["bad_reply"] if event["peer"] == "predictor"]) == len(
        messages["predictor_progress"])
    assert len(logged["bad_reply"]) == len(messages["compute"]) + len(messages["predictor_progress"])
    assert len(logged["bad_observation"]) == len(messages["observe"])
    assert len(logged["bad_control_message"]) == len(messages["control"])
    assert not [event for event in events if event.get("event") == "control_message_refused"]


def logged_bad_messages(events: list[dict]) -> dict[str, list[dict]]:
    return {name: [event for event in events if event.get("event") == name]
            for name in ("bad_io_message", "bad_reply", "bad_observation", "bad_control_message")}


# ---- the whole graph again: hypothesis on the four receivers the in-process tests do not reach -------------

LIVE_FUZZ = settings(deadline=None, max_examples=40, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
IO_KINDS = (Acquire, Release, PrefetchHints, PredictorStats, PinSet, StatsRequest)
OBSERVE_KINDS = (RoutingObserved, HiddenObserved)


def live_fuzz_strategies(run_id: str) -> dict:
    """By socket: what hypothesis sends. `io`, `observe` and `predictor_progress` get only frames that fail
    `decode` for their kinds (a well-formed message would be acted on: a Release of a slot the router
    reads); `control` gets anything, well-formed messages included, since its sender is not a child."""
    observed = RoutingObserved(3, 1, [1, 2], [0.5, 0.5])
    wrong_kinds = [SlotsReady(1, [SlotGrant(5, 1, 2, True, 0.0, False)], False), TokenGenerated(0, 0)]
    return {
        "io": hypothesis_malformed_frames([Acquire(5, 0, [1, 2]), Release([SlotRef(0, 1, 1)]), StatsRequest(3),
                                           PrefetchHints(0, [PrefetchHint(3, 1.0)], "markov"), *wrong_kinds],
                                          expected_kinds=IO_KINDS),
        "control": hypothesis_frames([Hello(f"mer-io-{run_id}", 1), Ready(f"mer-router-{run_id}", 1, {}),
                                      Heartbeat(f"mer-predictor-{run_id}"), ChildFailed(f"mer-compute-0-{run_id}", "ValueError", "x", ""),
                                      JobDone({"tokens": []}), TokenGenerated(0, 0)]),
        "observe": hypothesis_malformed_frames([observed, *wrong_kinds], expected_kinds=OBSERVE_KINDS),
        "predictor_progress": hypothesis_malformed_frames([PredictorProgress(1, 1), *wrong_kinds],
                                                          expected_kinds=(PredictorProgress,)),
    }


def fuzz_socket(socket: zmq.Socket, strategy, sent: list[list[bytes]], is_answered: bool) -> None:
    """Send hypothesis's examples of `strategy` on `socket`, appending each to `sent`; when `is_answered`,
    each must be answered at once with an ErrorReply for no request."""

    @LIVE_FUZZ
    @given(frames=strategy)
    def send(frames):
        sent.append(frames)
        socket.send_multipart(frames)
        if is_answered:
            reply = decode(socket.recv_multipart(), expected_kinds=(ErrorReply,))
            assert reply.request_id == UNKNOWN_REQUEST_ID, reply

    send()


def fuzz_the_graph(runtime_dir: Path, run_id: str) -> dict[str, list[list[bytes]]]:
    """Hypothesis examples to four sockets of the running graph, from intruders: each message to `io` and
    `control` must be answered with an ErrorReply at once; then the I/O worker must still answer a
    StatsRequest. Returns what was sent, by socket."""
    context = zmq.Context()
    sockets = {name: open_socket(context, kind, f"ipc://{runtime_dir}/{name}.sock", identity=identity)
               for name, kind, identity in [("io", zmq.DEALER, b"intruder"), ("control", zmq.DEALER, b"intruder"),
                                            ("observe", zmq.PUSH, None), ("predictor_progress", zmq.PUSH, None)]}
    sent: dict[str, list[list[bytes]]] = {name: [] for name in sockets}
    try:
        for socket in sockets.values():
            socket.setsockopt(zmq.RCVTIMEO, int(RECEIVE_TIMEOUT_S * 1000))
        for name, strategy in live_fuzz_strategies(run_id).items():
            fuzz_socket(sockets[name], strategy, sent[name], is_answered=name in ("io", "control"))
        sockets["io"].send_multipart(encode(StatsRequest(78)))
        stats = decode(sockets["io"].recv_multipart(), expected_kinds=(IoStats,))
        assert stats.request_id == 78
        return sent
    finally:
        for socket in sockets.values():
            socket.close(linger=0)
        context.term()


@pytest.mark.heavy
@pytest.mark.slow
def test_the_receivers_of_a_running_generation_survive_hypothesis_fuzzing(leak_guard, tmp_path):
    """The I/O worker's ROUTER, the supervisor's control ROUTER, the predictor's observe PULL and the
    router's predictor_progress PULL, while the graph generates: every message is logged (and answered
    where the socket can), the graph keeps serving and ends with exit 0 and single-process tokens."""
    running = {}

    def fuzz(process, runtime_dir: Path, run_id: str):
        sent = fuzz_the_graph(runtime_dir, run_id)
        running["after fuzzing"] = process.poll() is None
        return sent

    _, _, events, sent = disturb_generation(leak_guard, tmp_path, fuzz)
    assert running["after fuzzing"], "the generation ended before the fuzzing did: raise STEPS"
    assert all(len(frames) >= LIVE_FUZZ.max_examples for frames in sent.values()), {
        name: len(frames) for name, frames in sent.items()}
    logged = logged_bad_messages(events)
    assert len(logged["bad_io_message"]) == len(sent["io"])
    assert all(event["peer"] == "intruder" for event in logged["bad_io_message"])
    assert len(logged["bad_control_message"]) == len(sent["control"])
    assert all(event["child"] == "intruder" for event in logged["bad_control_message"])
    assert len(logged["bad_observation"]) == len(sent["observe"])
    assert len(logged["bad_reply"]) == len(sent["predictor_progress"])
    assert all(event["peer"] == "predictor" for event in logged["bad_reply"])
    troubles = ("child_died", "child_restarted", "child_stuck", "child_stalled", "control_message_refused")
    assert not [event for event in events if event.get("event") in troubles]
