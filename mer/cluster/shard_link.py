"""The router's connection to one remote shard group: a CURVE client DEALER over tcp
(`mer.cluster.secure_socket`), sending `ShardLayerRequest`s and receiving `ShardLayerResult`s or
`ErrorReply`s. `mer.router.remote_shards.RemoteShards` drives one link per shard; its tests may give it
links of their own with the same two coroutines (`send`, `recv`) and `close`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import zmq
import zmq.asyncio

from mer.cluster.keys import load_key_pair, load_public_key
from mer.cluster.secure_socket import curve_client_socket
from mer.protocol import ErrorReply, ShardLayerRequest, ShardLayerResult, decode, encode


class ShardLink(Protocol):
    endpoint: str

    async def send(self, request: ShardLayerRequest) -> None: ...

    async def recv(self) -> ShardLayerResult | ErrorReply:
        """The next reply; a malformed one raises ProtocolError."""
        ...

    def close(self) -> None: ...


class CurveShardLink:
    """A CURVE client DEALER connected to one shard group's `tcp://HOST:PORT` (the shard's `shard.public`
    is the server it trusts; the router's key pair is `router.public`/`router.secret` of the key dir)."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, key_dir: str | Path):
        self.endpoint = endpoint
        self.socket = curve_client_socket(context, zmq.DEALER, load_key_pair(key_dir, "router"),
                                          load_public_key(key_dir, "shard"))
        self.socket.connect(endpoint)

    async def send(self, request: ShardLayerRequest) -> None:
        await self.socket.send_multipart(encode(request), copy=False)

    async def recv(self) -> ShardLayerResult | ErrorReply:
        frames = await self.socket.recv_multipart(copy=False)
        return decode(frames, expected_kinds=(ShardLayerResult, ErrorReply))

    def close(self) -> None:
        self.socket.close(linger=0)
