"""Stopping the process graph: `Shutdown` to the router, then to the other children, then SIGTERM, then SIGKILL.

Children still starting get SIGTERM at once (they listen for `Shutdown` only once ready); whatever is
alive after the grace period (`shutdown_grace_s`) gets SIGTERM (`child_terminated`), then SIGKILL
(`child_killed`). Every child is joined before `shut_down` returns; the supervisor then removes the
arena and the runtime directory (`mer.runtime.supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import zmq
import zmq.asyncio

from mer.protocol import Shutdown, encode
from mer.runtime.spawned_child import Child

KILL_WAIT_S = 2.0


async def shut_down(children: list[Child], control: zmq.asyncio.Socket, grace_s: float, log) -> None:
    """Shutdown in two stages, then terminate, then kill; every child is joined before returning.

    The router, which drives the job, is stopped first and the other children only once it has
    exited (or the grace period is over): stopped the other way round, a router still in its job
    could fail on workers that are going away, and report that instead of the real cause."""
    deadline = time.monotonic() + grace_s
    alive = [child for child in children if child.process.is_alive()]
    for stage in ([c for c in alive if c.role == "router"], [c for c in alive if c.role != "router"]):
        for child in stage:
            await _stop_child(control, child, log)
        await _wait_exit(stage, max(0.0, deadline - time.monotonic()))
    for child in alive:
        if child.process.is_alive():
            log.warning("child_terminated", child=child.name, reason="no exit within the grace period")
            child.process.terminate()
    await _wait_exit(alive, KILL_WAIT_S)
    for child in alive:
        if child.process.is_alive():
            log.warning("child_killed", child=child.name)
            child.process.kill()
    loop = asyncio.get_running_loop()
    for child in children:
        child.process.join(KILL_WAIT_S)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(child.process.sentinel)
        if child.process.exitcode is not None:
            child.process.close()  # frees the sentinel and pipe; a child still alive here keeps them


async def _stop_child(control: zmq.asyncio.Socket, child: Child, log) -> None:
    """Send `Shutdown` to a ready child; terminate one still starting (SIGTERM)."""
    if not child.process.is_alive():
        return
    if not child.ready:
        # Still starting: it listens for Shutdown only once ready (and a Shutdown sent before it
        # connected is dropped), and it has nothing to drain, so it is stopped at once.
        log.warning("child_terminated", child=child.name, reason="not ready at shutdown")
        child.process.terminate()
        return
    with contextlib.suppress(zmq.ZMQError):  # gone meanwhile: the signals of shut_down still apply
        await control.send_multipart([child.name.encode(), *encode(Shutdown("graph shutting down"))],
                                     flags=zmq.NOBLOCK, copy=False)


async def _wait_exit(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(child.process.is_alive() for child in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
