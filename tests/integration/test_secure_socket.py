"""CURVE over real tcp sockets on 127.0.0.1: the listed client exchanges messages; a client with an
unlisted key, without CURVE, or with another server's key is refused (never delivered, never answered)
and logged as `curve_client_refused` with its reason."""

from __future__ import annotations

import asyncio

import pytest
import structlog
import zmq
import zmq.asyncio

from mer.cluster.client_allow_list import ClientAllowList
from mer.cluster.handshake_watch import HandshakeWatch
from mer.cluster.keys import CurveKeyPair
from mer.cluster.secure_socket import curve_client_socket, curve_server_socket
from mer.errors import KeyFileError

REFUSAL_WAIT_S = 3.0
SILENCE_S = 0.5


def key_pair() -> CurveKeyPair:
    return CurveKeyPair(*zmq.curve_keypair())


ROUTER_KEYS, SHARD_KEYS, STRANGER_KEYS = key_pair(), key_pair(), key_pair()


async def wait_for(condition, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def receive_or_none(socket: zmq.asyncio.Socket, timeout_s: float) -> list[bytes] | None:
    if await socket.poll(int(timeout_s * 1000)):
        return await socket.recv_multipart()
    return None


def run_with_server(scenario, allow_list: bool = True, server_keys: CurveKeyPair = SHARD_KEYS,
                    allowed: bytes = ROUTER_KEYS.public):
    """Run `scenario(context, endpoint, allow, watch, server)` against a CURVE ROUTER bound on 127.0.0.1."""

    async def main():
        context = zmq.asyncio.Context()
        allow = ClientAllowList(context, [allowed]) if allow_list else None
        if allow is not None:
            allow.start()
        server = curve_server_socket(context, zmq.ROUTER, server_keys)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        watch = HandshakeWatch(server)
        watch.start()
        try:
            with structlog.testing.capture_logs() as logs:
                await scenario(context, f"tcp://127.0.0.1:{port}", allow, watch, server)
            return logs
        finally:
            await watch.stop()
            if allow is not None:
                allow.stop()
            server.close(linger=0)
            context.term()

    return asyncio.run(main())


def refusals(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "curve_client_refused"]


def test_the_listed_client_exchanges_encrypted_messages():
    async def scenario(context, endpoint, allow, watch, server):
        client = curve_client_socket(context, zmq.DEALER, ROUTER_KEYS, SHARD_KEYS.public)
        client.connect(endpoint)
        try:
            for number in range(3):
                await client.send_multipart([b"request", str(number).encode()])
                identity, *request = await receive_or_none(server, REFUSAL_WAIT_S)
                assert request == [b"request", str(number).encode()]
                await server.send_multipart([identity, b"reply", str(number * 10).encode()])
                assert await receive_or_none(client, REFUSAL_WAIT_S) == [b"reply", str(number * 10).encode()]
            assert client.getsockopt(zmq.MECHANISM) == zmq.CURVE
            assert server.getsockopt(zmq.MECHANISM) == zmq.CURVE
            assert (allow.admitted, allow.refused) == (1, 0)
            await wait_for(lambda: watch.succeeded == 1, REFUSAL_WAIT_S)
            assert watch.refused == 0
        finally:
            client.close(linger=0)

    assert refusals(run_with_server(scenario)) == []


def test_keys_made_by_the_keys_command_connect_router_to_shard(tmp_path):
    """`mer-pipeline keys` files, as each side loads them: the shard its pair and the router's public key,
    the router its pair and the shard's public key."""
    from mer.cli.main import main
    from mer.cluster.keys import load_key_pair, load_public_key

    assert main(["keys", "--out", str(tmp_path)]) == 0
    shard_keys, router_public = load_key_pair(tmp_path, "shard"), load_public_key(tmp_path, "router")

    async def scenario(context, endpoint, allow, watch, server):
        router = curve_client_socket(context, zmq.DEALER, load_key_pair(tmp_path, "router"),
                                     load_public_key(tmp_path, "shard"))
        router.connect(endpoint)
        try:
            await router.send_multipart([b"ping"])
            identity, *request = await receive_or_none(server, REFUSAL_WAIT_S)
            assert request == [b"ping"]
            await server.send_multipart([identity, b"pong"])
            assert await receive_or_none(router, REFUSAL_WAIT_S) == [b"pong"]
            assert (allow.admitted, allow.refused) == (1, 0)
        finally:
            router.close(linger=0)

    assert refusals(run_with_server(scenario, server_keys=shard_keys, allowed=router_public)) == []


def refused_client_scenario(make_client, expected_reason: str):
    """A client made by `make_client(context)` sends a request: it is refused and logged; the server sees
    nothing and the client gets nothing; the listed client still gets through afterwards."""
    counts = {}

    async def scenario(context, endpoint, allow, watch, server):
        intruder = make_client(context)
        intruder.connect(endpoint)
        friend = curve_client_socket(context, zmq.DEALER, ROUTER_KEYS, SHARD_KEYS.public)
        try:
            await intruder.send_multipart([b"request", b"secret?"])
            await wait_for(lambda: allow.refused + watch.refused >= 1, REFUSAL_WAIT_S)
            assert await receive_or_none(server, SILENCE_S) is None
            assert await receive_or_none(intruder, 0.05) is None
            friend.connect(endpoint)
            await friend.send_multipart([b"request", b"hello"])
            identity, *request = await receive_or_none(server, REFUSAL_WAIT_S)
            assert request == [b"request", b"hello"]  # the intruder's message never arrives, before or after
            counts.update(key=allow.refused, handshake=watch.refused)
        finally:
            intruder.close(linger=0)
            friend.close(linger=0)

    logs = refusals(run_with_server(scenario))
    assert logs and {entry["reason"] for entry in logs} == {expected_reason}
    assert all(entry["log_level"] == "warning" for entry in logs)
    return logs, counts


def test_a_client_with_an_unlisted_key_is_refused_and_logged_with_its_key():
    logs, counts = refused_client_scenario(
        lambda context: curve_client_socket(context, zmq.DEALER, STRANGER_KEYS, SHARD_KEYS.public), "key_not_listed")
    assert {entry["client_key"] for entry in logs} == {STRANGER_KEYS.public.decode()}
    assert counts["key"] >= 1 and counts["handshake"] == 0  # logged once per try, by ZAP only


def test_a_client_without_curve_is_refused():
    logs, counts = refused_client_scenario(lambda context: plain_dealer(context), "zmtp_mechanism_mismatch")
    assert counts["key"] == 0 and counts["handshake"] >= 1
    assert all(entry["endpoint"].startswith("tcp://127.0.0.1:") for entry in logs)


def test_a_client_that_trusts_another_server_key_is_refused():
    _, counts = refused_client_scenario(
        lambda context: curve_client_socket(context, zmq.DEALER, ROUTER_KEYS, STRANGER_KEYS.public), "zmtp_cryptographic")
    assert counts["key"] == 0 and counts["handshake"] >= 1


def plain_dealer(context) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    return socket


def test_without_an_allow_list_no_client_is_admitted():
    """ZAP_ENFORCE_DOMAIN: a server whose context has no ZAP handler refuses even the right keys."""

    async def scenario(context, endpoint, allow, watch, server):
        client = curve_client_socket(context, zmq.DEALER, ROUTER_KEYS, SHARD_KEYS.public)
        client.connect(endpoint)
        try:
            await client.send_multipart([b"request"])
            await wait_for(lambda: watch.refused >= 1, REFUSAL_WAIT_S)
            assert await receive_or_none(server, SILENCE_S) is None
            assert watch.succeeded == 0
        finally:
            client.close(linger=0)

    logs = refusals(run_with_server(scenario, allow_list=False))
    assert logs and {entry["reason"] for entry in logs} == {"no_zap_handler"}


def test_an_empty_or_malformed_allow_list_is_an_error():
    context = zmq.asyncio.Context()
    try:
        with pytest.raises(KeyFileError, match="allow list is empty"):
            ClientAllowList(context, [])
        with pytest.raises(KeyFileError, match="40 characters"):
            ClientAllowList(context, [b"short"])
    finally:
        context.term()


@pytest.mark.parametrize("wire_dtype", ["f32", "f16"])
def test_a_shard_layer_request_and_its_result_over_curve(wire_dtype):
    """The wire format over the secured pair: the shard decodes the request, answers from its rows, and
    the router gets the outputs back exactly as they were sent (f32: bit for bit)."""
    import numpy as np

    from mer.cluster.wire_precision import from_wire, to_wire
    from mer.protocol import ShardLayerRequest, ShardLayerResult, decode, encode

    x = np.random.default_rng(3).standard_normal((6, 128), dtype=np.float32)

    async def scenario(context, endpoint, allow, watch, server):
        client = curve_client_socket(context, zmq.DEALER, ROUTER_KEYS, SHARD_KEYS.public)
        client.connect(endpoint)
        try:
            request = ShardLayerRequest(5, 30, 1, [2, 7], [0, 4, 6], to_wire(x, wire_dtype))
            await client.send_multipart(encode(request), copy=False)
            identity, *frames = await server.recv_multipart(copy=False)
            received = decode(frames, expected_kinds={ShardLayerRequest})
            rows = from_wire(received.x)
            outputs = rows[::-1].copy()  # the shard's "experts": any function of its rows
            await server.send_multipart([identity, *encode(ShardLayerResult(5, 1, to_wire(outputs, wire_dtype), 3.5))],
                                        copy=False)
            result = decode(await client.recv_multipart(copy=False), expected_kinds={ShardLayerResult})
            result.check_answers(request)
            expected = x[::-1] if wire_dtype == "f32" else x.astype(np.float16)[::-1].astype(np.float32)
            assert from_wire(result.outputs).tobytes() == expected.tobytes()
        finally:
            client.close(linger=0)

    run_with_server(scenario)
