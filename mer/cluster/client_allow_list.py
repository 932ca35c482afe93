"""The shard group's ZAP handler: admits exactly the CURVE clients whose public keys it lists.

`ClientAllowList(context, [router_public, ...])` runs pyzmq's `AsyncioAuthenticator` on the event
loop for every CURVE server socket of `context` in the ZAP domain `mer.cluster.secure_socket.ZAP_DOMAIN`.
A client whose key is not listed is refused during its handshake (it never gets a reply) and logged
as `curve_client_refused` (`reason` `key_not_listed`, its public key, which is not a secret). The
refusals before a client's key reaches ZAP (no CURVE at all, a wrong server key) are seen by
`mer.cluster.handshake_watch.HandshakeWatch`.
"""

from __future__ import annotations

from collections.abc import Iterable

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator

from mer.cluster.keys import Z85_KEY_LENGTH
from mer.cluster.secure_socket import ZAP_DOMAIN
from mer.errors import KeyFileError
from mer.logging_setup import get_logger


class ClientAllowList:
    """ZAP for one context: CURVE clients admitted by public key (see the module docstring)."""

    def __init__(self, context: zmq.Context, allowed_public_keys: Iterable[bytes]):
        self.allowed = frozenset(bytes(key) for key in allowed_public_keys)
        if not self.allowed:
            raise KeyFileError("the CURVE allow list is empty: no client could connect")
        for key in self.allowed:
            if len(key) != Z85_KEY_LENGTH:
                raise KeyFileError(f"allowed client key {key!r}: a z85 public key has {Z85_KEY_LENGTH} characters")
        self.refused = 0  # handshakes refused by key
        self.admitted = 0
        self.authenticator = AsyncioAuthenticator(context)

    def start(self) -> None:
        """Start answering ZAP requests (call in the running event loop, before a client connects)."""
        self.authenticator.start()
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def stop(self) -> None:
        self.authenticator.stop()

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's credentials provider: whether the client with this z85 public key may connect."""
        if client_key in self.allowed:
            self.admitted += 1
            return True
        self.refused += 1
        get_logger().warning("curve_client_refused", reason="key_not_listed", domain=domain,
                             client_key=client_key.decode("ascii", "replace"))
        return False
