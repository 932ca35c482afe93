"""`mer-pipeline shard-serve`: a real graph (router, I/O worker, predictor, 2 compute workers) serving
`ShardLayerRequest`s over real tcp with real CURVE, from a client in this process.

Numbers: the f32 outputs must equal mer's own expert computation in this process bit for bit (the
compute workers' `item_partials` on the payload read with plain reads, d_ff slices summed in slice
order: `sum_slices`), and an f16 request's outputs must equal that reference on the widened rows,
rounded to f16 (also bit for bit). An expert the shard does not serve (or a layer outside its store)
gets an error naming the shard and the expert; a malformed message gets an error and the shard keeps
serving; a client whose key is not listed is never answered and is logged as
`curve_client_refused`; `StopShardGroup` ends the command with 0, its summary, and nothing left behind
(the leak guard); SIGTERM brings the graph down the same way (exit 143).
"""

from __future__ import annotations

import json
import signal
import uuid

import numpy as np
import pytest
import zmq

from mer.cluster.keys import CurveKeyPair, load_key_pair, load_public_key, write_key_files
from mer.cluster.secure_socket import curve_client_socket
from mer.cluster.wire_precision import from_wire, to_wire
from mer.compute.batches import item_partials, sum_slices
from mer.compute.slicing import plan_slices
from mer.protocol import UNKNOWN_REQUEST_ID, ErrorReply, ShardLayerRequest, ShardLayerResult, StopShardGroup, decode, encode
from mer.store.reader import ExpertStore
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, RunningPipeline

pytestmark = pytest.mark.slow  # starts the process graph

SHARD = 1
SERVED = "0-3,8-11"  # layer 0 experts 0-3 and layer 1 experts 0-3 of 2 x 8
EXPERT_SLICES = 2
REPLY_WAIT_MS = 60_000  # generous: a loaded 2-core machine; a missing answer fails the test, never hangs it
REFUSED_SILENCE_MS = 1_000


def shard_argv(store, keys, log_path) -> list[str]:
    return [MER_PIPELINE, "shard-serve", "--store", str(store), "--bind", "tcp://127.0.0.1:0", "--keys", str(keys),
            "--shard", str(SHARD), "--experts", SERVED, "--compute-workers", "2", "--kernel-threads", "1",
            "--expert-slices", str(EXPERT_SLICES), "--log-file", str(log_path),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), "--json"]


def reference_rows(store: ExpertStore, moe_layer: int, experts: list[int], offsets: list[int],
                   x: np.ndarray) -> np.ndarray:
    """Each row's expert output, computed in this process as the compute workers compute it."""
    manifest = store.manifest
    slices = plan_slices(manifest.layers[moe_layer].format, EXPERT_SLICES)
    rows = []
    for index, expert in enumerate(experts):
        payload = store.read_payload(manifest.expert_id(moe_layer, expert))
        rows.append(sum_slices(item_partials(payload, x[offsets[index]:offsets[index + 1]], slices)))
    return np.concatenate(rows)


def ask(client: zmq.Socket, message, wait_ms: int = REPLY_WAIT_MS):
    client.send_multipart(encode(message))
    assert client.poll(wait_ms), f"no answer to {type(message).__name__} within {wait_ms} ms"
    return decode(client.recv_multipart(copy=False))


def start_shard(leak_guard, tmp_path, pipeline_stores):
    keys = tmp_path / "keys"
    write_key_files(keys)
    log_path = tmp_path / f"shard-{uuid.uuid4().hex[:8]}.jsonl"
    running = RunningPipeline.command(leak_guard, shard_argv(pipeline_stores["tiny"], keys, log_path), log_path)
    endpoint = running.wait_for_event("shard_group_listening")[0]["endpoint"]
    return running, keys, endpoint


def test_shard_group_answers_bit_identical_refuses_foreign_experts_and_keys_and_stops(
        leak_guard, tmp_path, pipeline_stores):
    store = ExpertStore.open(pipeline_stores["tiny"])
    running, keys, endpoint = start_shard(leak_guard, tmp_path, pipeline_stores)
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
    context = zmq.Context()
    router_keys = load_key_pair(keys, "router")
    client = curve_client_socket(context, zmq.DEALER, router_keys, load_public_key(keys, "shard"))
    stranger = curve_client_socket(context, zmq.DEALER, CurveKeyPair(*zmq.curve_keypair()),
                                   load_public_key(keys, "shard"))
    try:
        client.connect(endpoint)
        rng = np.random.default_rng(17)
        d_model = store.manifest.geometry.d_model
        cases = [(0, [1, 3], [0, 3, 5]), (1, [0, 2, 3], [0, 1, 5, 6])]  # (moe_layer, experts, row_offsets)
        for request_id, (moe_layer, experts, offsets) in enumerate(cases):
            x = rng.standard_normal((offsets[-1], d_model), dtype=np.float32)
            request = ShardLayerRequest(request_id, request_id, moe_layer, experts, offsets, x)
            result = ask(client, request)
            assert isinstance(result, ShardLayerResult), result
            result.check_answers(request)
            assert result.shard == SHARD and result.compute_us > 0
            expected = reference_rows(store, moe_layer, experts, offsets, x)
            assert np.all(np.isfinite(expected)) and np.abs(expected).max() > 0
            assert np.array_equal(result.outputs.view(np.uint32), expected.view(np.uint32))  # bit for bit

        x16 = to_wire(rng.standard_normal((4, d_model), dtype=np.float32), "f16")
        request = ShardLayerRequest(7, 7, 1, [1], [0, 4], x16)
        result = ask(client, request)
        result.check_answers(request)
        expected16 = to_wire(reference_rows(store, 1, [1], [0, 4], from_wire(x16)), "f16")
        assert result.outputs.dtype == np.float16
        assert np.array_equal(result.outputs.view(np.uint16), expected16.view(np.uint16))

        x = rng.standard_normal((2, d_model), dtype=np.float32)
        refused = ask(client, ShardLayerRequest(9, 9, 0, [2, 5], [0, 1, 2], x))
        assert isinstance(refused, ErrorReply) and refused.request_id == 9
        assert refused.error_type == "mer.errors.ShardExpertsError"
        assert f"shard {SHARD} does not serve layer 0 experts 5 (id 5)" in refused.message, refused.message
        assert "2 (id 2)" not in refused.message  # expert 2 is served: only the missing one is named
        no_layer = ask(client, ShardLayerRequest(11, 11, 5, [0], [0, 1], x[:1]))
        assert isinstance(no_layer, ErrorReply) and no_layer.error_type == "mer.errors.ShardExpertsError"
        assert "shard 1: MoE layer 5 is not in its store (2 MoE layers)" in no_layer.message, no_layer.message

        client.send_multipart([b"\x46", b"not msgpack"])  # garbage: answered, and the shard keeps serving
        assert client.poll(REPLY_WAIT_MS)
        garbage = decode(client.recv_multipart(copy=False))
        assert isinstance(garbage, ErrorReply) and garbage.request_id == UNKNOWN_REQUEST_ID
        assert garbage.error_type == "mer.errors.ProtocolError"

        stranger.connect(endpoint)
        stranger.send_multipart(encode(ShardLayerRequest(10, 10, 0, [1], [0, 1], x[:1])))
        assert not stranger.poll(REFUSED_SILENCE_MS), "a client with an unlisted key got an answer"
        stranger.close(linger=0)

        assert ask(client, StopShardGroup()) == StopShardGroup()
    finally:
        client.close(linger=0)
        stranger.close(linger=0)
        context.term()
    finished = running.finish().check_ok()
    summary = json.loads(finished.stdout)
    assert summary["kind"] == "shard" and summary["shard"] == SHARD and summary["endpoint"] == endpoint
    assert (summary["requests"], summary["rows"], summary["expert_batches"], summary["errors"]) == (3, 15, 6, 3)
    assert summary["experts_served"] == 8 and summary["compute_workers"] == 2
    assert summary["hits"] + summary["misses"] == 6
    events = finished.events
    refusals = [event for event in events if event.get("event") == "curve_client_refused"]
    assert refusals and all(event["reason"] == "key_not_listed" for event in refusals)
    assert router_keys.public.decode() not in {event["client_key"] for event in refusals}
    assert [event["request_id"] for event in events if event.get("event") == "shard_request_refused"] == [9, 11]
    failed = [event for event in events if event.get("event") == "shard_request_failed"]
    assert [event["request_id"] for event in failed] == [UNKNOWN_REQUEST_ID]
    assert any(event.get("event") == "shard_group_summary" for event in events)


def test_sigterm_brings_the_shard_group_down(leak_guard, tmp_path, pipeline_stores):
    running, _, _ = start_shard(leak_guard, tmp_path, pipeline_stores)
    running.send_signal(signal.SIGTERM)
    finished = running.finish()
    assert finished.returncode == 143, finished.stderr
    assert finished.stdout == ""
    assert any(event.get("event") == "job_cancelled" for event in finished.events)
