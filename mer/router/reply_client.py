"""What the router's request/reply clients share (`mer.router.io_client`, `mer.router.compute_client`).

Each client owns one socket and one receiver task that resolves the future of every reply by its
request or job id, so the router's event loop never blocks. An `ErrorReply` from the other side is
raised locally as `RemoteError` (type, message and traceback of the remote error). A malformed or
unexpected message (bad frames, a reply from a peer the job was not sent to, an unknown id) is
logged as `bad_reply` and dropped: the receiver keeps serving the replies that follow.
"""

from __future__ import annotations

import asyncio
import itertools

import zmq
import zmq.asyncio

from mer.errors import PipelineError
from mer.logging_setup import get_logger
from mer.protocol import ErrorReply, raise_remote


class PendingReplies:
    """Futures waiting for replies, and queues for requests answered in parts (streams), by id."""

    def __init__(self):
        self.futures: dict[int, asyncio.Future] = {}
        self.streams: dict[int, asyncio.Queue] = {}
        self.ids = itertools.count(1)

    def new_stream(self) -> tuple[int, asyncio.Queue]:
        """An id whose replies are queued as they come (the last part ends it: `resolve(..., final=True)`)."""
        request_id = next(self.ids)
        self.streams[request_id] = asyncio.Queue()
        return request_id, self.streams[request_id]

    def new(self) -> tuple[int, asyncio.Future]:
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.futures[request_id] = future
        return request_id, future

    def resolve(self, request_id: int, message, final: bool = True) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            if final or isinstance(message, ErrorReply):
                del self.streams[request_id]
            stream.put_nowait(message)
            return
        future = self.futures.pop(request_id, None)
        if future is None:
            raise PipelineError(f"{type(message).__name__} for id {request_id}, which no request is waiting for")
        if future.done():
            return
        if isinstance(message, ErrorReply):
            try:
                raise_remote(message)
            except Exception as error:
                future.set_exception(error)
        else:
            future.set_result(message)

    def fail_all(self, error: BaseException) -> None:
        for future in self.futures.values():
            if not future.done():
                future.set_exception(error)
        self.futures.clear()
        for stream in self.streams.values():
            stream.put_nowait(error)
        self.streams.clear()


class ReplyClient:
    """One socket and the receiver task that hands every message to `_on_frames`; when receiving
    fails, every pending reply fails with a `PipelineError` naming the `peer`."""

    def __init__(self, socket: zmq.asyncio.Socket, peer: str):
        socket.setsockopt(zmq.LINGER, 0)
        self.socket = socket
        self.peer = peer
        self.pending = PendingReplies()
        self.receiver = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            try:
                frames = await self.socket.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the socket itself failed: nothing more will arrive
                self.pending.fail_all(PipelineError(f"{self.peer} connection failed: {error}"))
                return
            try:
                self._on_frames(frames)
            except Exception as error:  # one bad message: log it, keep serving
                get_logger().warning("bad_reply", peer=self.peer, error=str(error))

    def close(self) -> None:
        self.receiver.cancel()
        self.socket.close(linger=0)
