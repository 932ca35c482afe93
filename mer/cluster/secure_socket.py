"""CURVE-authenticated, encrypted ZeroMQ sockets over tcp: the shard group's side (the CURVE server,
which binds) and the router's side (the CURVE client, which connects).

The server holds its own key pair and asks ZAP (`mer.cluster.client_allow_list.ClientAllowList`,
domain `ZAP_DOMAIN`) whether a client's public key may connect; the client holds its own key pair
and the server's public key, so it talks only to the server that holds the matching secret. Every
frame after the handshake is encrypted and authenticated (CurveZMQ). A client refused by either
side never completes its handshake: its messages are never delivered and it never gets a reply.
"""

from __future__ import annotations

import zmq

from mer.cluster.keys import CurveKeyPair

ZAP_DOMAIN = "mer-cluster"


def curve_server_socket(context: zmq.Context, socket_type: int, server_keys: CurveKeyPair) -> zmq.Socket:
    """A socket that speaks CURVE as the server (bind it: `socket.bind("tcp://HOST:PORT")`). Its clients
    are admitted by the ZAP handler of `context` (start a `ClientAllowList` first: without one libzmq
    admits every client that knows the server's public key)."""
    socket = context.socket(socket_type)
    socket.setsockopt(zmq.LINGER, 0)
    socket.curve_server = True
    socket.curve_publickey = server_keys.public
    socket.curve_secretkey = server_keys.secret
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler for the domain: refuse, never admit
    return socket


def curve_client_socket(context: zmq.Context, socket_type: int, client_keys: CurveKeyPair,
                        server_public: bytes) -> zmq.Socket:
    """A socket that speaks CURVE as a client with its own key pair to the server whose public key is
    `server_public` (connect it: `socket.connect("tcp://HOST:PORT")`)."""
    socket = context.socket(socket_type)
    socket.setsockopt(zmq.LINGER, 0)
    socket.curve_serverkey = server_public
    socket.curve_publickey = client_keys.public
    socket.curve_secretkey = client_keys.secret
    return socket
