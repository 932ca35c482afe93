"""The life of a child process of the graph: name, handshake, serve, report failure, exit.

Every child (`workers/*.py`) is a role object: `start()` initialises it and returns the info it
reports in `Ready`; `serve(stop)` runs until `stop` is set (the supervisor's `Shutdown`) or its work
is done; `on_control(message)` takes other control messages; `close()` releases what it holds.
`run_child` wraps a role with what all children share:

1. process title `mer-<role>-<run>`; membership of the run and a watch on the supervisor, so a child
   never outlives it and the last process out removes the run's resources (`mer.runtime.membership`,
   `mer.runtime.supervisor_watch`);
2. SIGINT ignored (Ctrl-C reaches the whole process group; the supervisor decides and sends
   `Shutdown`), SIGTERM ends the child;
3. structlog JSON to the run's log file, written off the event loop (or warnings only to stderr);
4. a DEALER on `control.sock` with the child's name as identity: `Hello`, then `Ready(info)` or
   `ChildFailed(type, message, traceback)`; once ready, a `Heartbeat` every second or so for the
   supervisor's watchdog (`mer.runtime.stall_watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import sys

import setproctitle
import uvloop
import zmq
import zmq.asyncio

from mer.config import PipelineConfig
from mer.errors import ProtocolError
from mer.logging_setup import configure_logging, flush_log_file, get_logger, with_log_writes_in_background
from mer.protocol import ChildFailed, ErrorReply, Heartbeat, Hello, Ready, Shutdown, decode, encode, error_fields
from mer.runtime.membership import RunMembership
from mer.runtime.run_spec import RunSpec
from mer.runtime.stall_watch import heartbeat_interval_s
from mer.runtime.supervisor_watch import EXIT_SUPERVISOR_LOST, die_with_supervisor, leave_run, watch_supervisor

FAILURE_REPORT_TIMEOUT_S = 2.0


class ChildContext:
    """What a role gets: its name, the run, the configuration, a ZeroMQ context and a logger."""

    def __init__(self, name: str, role: str, index: int | None, run: RunSpec):
        self.name = name
        self.role = role
        self.index = index
        self.run = run
        self.config = PipelineConfig.from_dict(run.config, source=f"{name} configuration")
        self.zmq = zmq.asyncio.Context()
        self.log = get_logger()
        self.control: zmq.asyncio.Socket | None = None

    async def send_control(self, message) -> None:
        assert self.control is not None
        await self.control.send_multipart(encode(message), copy=False)


def run_child(role_factory, role: str, index: int | None, name: str, run_json: str) -> None:
    """Entry point of a spawned child; exits with 0 after a clean shutdown, 1 after a failure."""
    setproctitle.setproctitle(name)
    run = RunSpec.from_json(run_json)
    die_with_supervisor(run.supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    membership = RunMembership.join(run.run_id, run.runtime_dir)
    if membership is None:  # the run is gone or being removed: nothing to do here
        os._exit(EXIT_SUPERVISOR_LOST)
    configure_logging(name, log_file=run.config.get("log_file"), run_id=run.run_id, worker=index)
    watch_supervisor(run.supervisor_pid, membership)
    try:
        code = uvloop.run(with_log_writes_in_background(_child_main(role_factory, ChildContext(name, role, index, run))))
    finally:
        leave_run(membership)
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> None:
    """End the child with `code` once its run is over: its role closed, its sockets closed and the run
    left. The interpreter's own teardown (freeing every module and the model's arrays) would cost each
    child 0.2-0.4 s of CPU before the supervisor could reap it, at the end of every run; the log file
    and the standard streams are flushed first, as that teardown would have."""
    flush_log_file()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def _child_main(role_factory, context: ChildContext) -> int:
    control = context.zmq.socket(zmq.DEALER)
    control.setsockopt(zmq.IDENTITY, context.name.encode())
    control.setsockopt(zmq.LINGER, int(FAILURE_REPORT_TIMEOUT_S * 1000))
    control.connect(context.run.endpoint("control"))
    context.control = control
    await context.send_control(Hello(context.name, os.getpid()))
    role = None
    try:
        role = role_factory(context)
        info = await role.start()
        await context.send_control(Ready(context.name, os.getpid(), info))
        context.log.info("child_ready", **info)
        stop = asyncio.Event()
        listener = asyncio.create_task(_listen_control(control, role, stop))
        heartbeats = asyncio.create_task(_send_heartbeats(context))
        try:
            await role.serve(stop)
        finally:
            listener.cancel()
            heartbeats.cancel()
        context.log.info("child_stopped")
        return 0
    except Exception as error:  # report every failure to the supervisor, then exit non-zero
        fields = error_fields(error)
        context.log.error("child_failed", error_type=fields.error_type, message=fields.message)
        await context.send_control(ChildFailed(context.name, *fields))
        return 1
    finally:
        if role is not None:
            closing = role.close()
            if inspect.isawaitable(closing):
                await closing
        # Only the control socket may hold the exit up (its ChildFailed must reach the supervisor): a
        # message queued for a peer that is gone (a reply to a killed router) is dropped at once.
        control.close(linger=int(FAILURE_REPORT_TIMEOUT_S * 1000))
        context.zmq.destroy(linger=0)


async def _send_heartbeats(context: ChildContext) -> None:
    """Tell the supervisor's watchdog that this child's event loop is alive (`mer.runtime.stall_watch`)."""
    interval = heartbeat_interval_s(context.config.stall_timeout_s)
    heartbeat = encode(Heartbeat(context.name))
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(zmq.Again):  # the supervisor is not reading (stopped): never block the child
            await context.control.send_multipart(heartbeat, flags=zmq.NOBLOCK, copy=False)


async def _listen_control(control: zmq.asyncio.Socket, role, stop: asyncio.Event) -> None:
    while True:
        frames = await control.recv_multipart(copy=False)
        try:
            message = decode(frames)
        except ProtocolError as error:
            get_logger().warning("bad_control_message", error=str(error))
            continue
        if isinstance(message, Shutdown):
            stop.set()
            continue
        if isinstance(message, ErrorReply):  # the supervisor refused a message of this child: a bug, logged
            get_logger().warning("control_message_refused", error_type=message.error_type, error=message.message)
            continue
        try:
            await role.on_control(message)
        except Exception as error:  # a control message the role cannot take: logged, never the end of listening
            get_logger().warning("bad_control_message", error=str(error))


async def receive_unless_stopped(socket: zmq.asyncio.Socket, stop: asyncio.Event):
    """The next multipart message of `socket`, or None once `stop` is set."""
    receiving = asyncio.ensure_future(socket.recv_multipart(copy=False))
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if receiving in done:
        stopping.cancel()
        return receiving.result()
    receiving.cancel()
    return None
