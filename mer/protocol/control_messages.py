"""The messages of a child's life on `control.sock`: its handshake, heartbeat, failure and shutdown, and
the word about a restarted or stuck child (docs/pipeline.md, "Messages"). The jobs' messages on the same
socket: `mer.protocol.job_messages` and `mer.protocol.serving_messages`.
"""

from mer.protocol.kinds import MessageKind
from mer.protocol.schema import ScalarMap, message


# --- control.sock: handshake and shutdown ---------------------------------------------------------


@message(MessageKind.HELLO)
class Hello:
    """A child's first word after it starts: who it is."""

    name: str
    pid: int


@message(MessageKind.READY)
class Ready:
    """A child finished initialising; `info` holds what the supervisor logs (backend, slots...)."""

    name: str
    pid: int
    info: ScalarMap


@message(MessageKind.CHILD_FAILED)
class ChildFailed:
    """A child hit a fatal error (in start-up or later) and is about to exit."""

    name: str
    error_type: str
    message: str
    traceback: str


@message(MessageKind.SHUTDOWN)
class Shutdown:
    """The supervisor asks a child to drain and exit."""

    reason: str


@message(MessageKind.HEARTBEAT)
class Heartbeat:
    """A ready child's event loop is alive: sent every `mer.runtime.stall_watch.heartbeat_interval_s`."""

    name: str


@message(MessageKind.IO_WORKER_RESTARTED)
class IoWorkerRestarted:
    """The supervisor to the router: the I/O worker `name` died and a new process (`pid`) is starting in
    its place. Every lease and request of the dead worker is void: the router fails its requests over
    to the new worker (`mer.router.io_client.IoClient`)."""

    name: str
    pid: int


@message(MessageKind.CHILD_STUCK)
class ChildStuck:
    """The router to the supervisor: child `name` (process `pid`; 0 when the router does not know it, as
    for the first I/O worker before its first `IoProgress`) has had work in hand (`work`: `compute job 12`,
    `I/O request 40`) and shown no progress on it for `silent_s` seconds, more than `job_deadline_s`:
    it is stuck (a busy loop, a deadlock that still uses CPU); the supervisor kills it like a stall."""

    name: str
    pid: int
    work: str
    silent_s: float
