"""Watches a CURVE server socket's handshakes (a ZeroMQ socket monitor) and logs the refusals that never
reach ZAP: a client without CURVE (`zmtp_mechanism_mismatch`), one that encrypts to another server's
key (`zmtp_cryptographic`), a malformed handshake, a server without a ZAP handler (`no_zap_handler`).
Each is one `curve_client_refused` event (warning) with `reason` (snake_case) and `endpoint` (the
server's bound endpoint). Refusals by
key are logged by `mer.cluster.client_allow_list.ClientAllowList`, not again here.

A refused client reconnects (every `reconnect_ivl`, 100 ms by default), and each try is logged again.
"""

from __future__ import annotations

import asyncio
import errno

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from mer.logging_setup import get_logger

_WATCHED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED


def refusal_reason(event: int, value: int) -> str:
    """A handshake failure as a snake_case reason: the ZMTP protocol error's name, else the errno's."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        try:
            return zmq.Event(value).name.removeprefix("PROTOCOL_ERROR_").lower()
        except ValueError:
            return f"protocol_error_{value:#x}"
    if value == errno.EFAULT:  # libzmq's answer when ZAP_ENFORCE_DOMAIN is set and no ZAP handler runs
        return "no_zap_handler"
    return f"handshake_failed_{errno.errorcode.get(value, str(value)).lower()}"


class HandshakeWatch:
    """A task reading the monitor of one (asyncio) socket: `refused` and `succeeded` count handshakes."""

    def __init__(self, socket: zmq.asyncio.Socket):
        self.socket = socket
        self.monitor = socket.get_monitor_socket(_WATCHED)
        self.refused = 0
        self.succeeded = 0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if not self.socket.closed:
            self.socket.disable_monitor()
        self.monitor.close(linger=0)

    async def _watch(self) -> None:
        while True:
            message = await recv_monitor_message(self.monitor)
            if message["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
                continue
            self.refused += 1
            get_logger().warning("curve_client_refused", reason=refusal_reason(message["event"], message["value"]),
                                 endpoint=message["endpoint"].decode(errors="replace"))
