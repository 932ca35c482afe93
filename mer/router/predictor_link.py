"""The router's link to the predictor: the observations it sends, and the predictor's deadline on them.

The router PUSHes routing observations (`RoutingObserved`, with the gate predictor `HiddenObserved`
too) to the predictor on `observe.sock`; nothing answers them: hints go from the predictor to the I/O
worker, and the router never waits for the predictor (its hints are only hints). A predictor spinning
in a busy loop uses CPU, so the stall watch cannot tell it from work. So the predictor's event loop
reports its progress to the router on `predictor_progress.sock` (`PredictorProgress`: its pid and the
observations it has consumed, every `progress_interval_s` while it consumes them), which this link
reads in a task of its own. Observations sent and no report since for `job_deadline_s`: the predictor
is stuck (`stuck`), and the router has the supervisor kill it (`ChildStuck`), which restarts it as
after a kill -9.

The deadline (`mer.router.work_deadlines`, worker 0) starts at the first observation sent after a
report (or after the start), and every report clears the observations in hand: the messages of one
predictor process cannot be matched with the router's count, since those queued for a dead predictor
are lost. A predictor that reports, even while behind, is never stuck; one that stops reporting while
observations keep coming is named within the deadline plus one check. A report that crosses an
observation on the way clears it too: the observation after it starts the deadline again (a predictor
stuck on the very last observations of a job is not named; nothing waits on it). A report from a new
pid (a restarted predictor) starts its deadline anew, as a compute worker's `Hello` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import zmq
import zmq.asyncio

from mer.logging_setup import get_logger
from mer.protocol import PredictorProgress, decode
from mer.router.work_deadlines import Overdue, WorkDeadlines

PREDICTOR = 0  # the predictor's number in its WorkDeadlines


class ObservationDeadline:
    """The predictor's deadline on the observations sent to it, on a given clock (see the module docstring)."""

    def __init__(self, deadline_s: float, now: float):
        self.deadlines = WorkDeadlines(deadline_s)
        self.deadlines.hello(PREDICTOR, now)
        self.pid = 0  # the predictor's pid in its last report (0: none yet)
        self.sent = 0  # observation messages sent in this run
        self.in_hand = 0  # sent since the predictor's last report
        self.reports = 0

    def observed(self, now: float) -> None:
        """One observation sent; the first after a report starts the deadline."""
        self.sent += 1
        if self.in_hand == 0:
            self.deadlines.sent(PREDICTOR, self.sent, now)
        self.in_hand += 1

    def progressed(self, report: PredictorProgress, now: float) -> None:
        """The predictor consumed observations: none is in hand any more, and it may be named stuck again."""
        self.reports += 1
        self.pid = report.pid
        self.deadlines.hello(PREDICTOR, now)
        self.in_hand = 0

    def overdue(self, now: float) -> list[Overdue]:
        """The predictor, once per report, if observations have waited for the deadline with no report:
        `job_id` is the first of them (a number of the router's count), `in_hand` how many were sent since.
        Call every `deadlines.interval_s`."""
        return [dataclasses.replace(overdue, in_hand=self.in_hand) for overdue in self.deadlines.overdue(now)]


class PredictorLink:
    """The PUSH of observations (`send_multipart`, as a socket's), the PULL of the predictor's reports, and
    its deadline (`stuck`)."""

    def __init__(self, context: zmq.asyncio.Context, observe_endpoint: str, progress_endpoint: str, name: str,
                 job_deadline_s: float = 8.0):
        self.name = name  # the predictor's process name
        self.deadline = ObservationDeadline(job_deadline_s, time.monotonic())
        self.observe = context.socket(zmq.PUSH)
        self.observe.setsockopt(zmq.LINGER, 0)
        self.observe.setsockopt(zmq.SNDHWM, 10_000)
        self.observe.connect(observe_endpoint)
        self.progress = context.socket(zmq.PULL)
        self.progress.setsockopt(zmq.LINGER, 0)
        self.progress.bind(progress_endpoint)
        self.receiver = asyncio.create_task(self._receive())

    @property
    def pid(self) -> int:
        """The current predictor's pid, as its last report said (0: no report yet)."""
        return self.deadline.pid

    async def send_multipart(self, frames, **kwargs) -> None:
        """Send one observation to the predictor (and count it for the deadline)."""
        self.deadline.observed(time.monotonic())
        await self.observe.send_multipart(frames, **kwargs)

    def stuck(self) -> list[Overdue]:
        """`ObservationDeadline.overdue` now. Call every `deadline.deadlines.interval_s`."""
        return self.deadline.overdue(time.monotonic())

    async def _receive(self) -> None:
        while True:
            try:
                frames = await self.progress.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the socket itself failed: no more reports (the deadline names it)
                get_logger().error("bad_reply", peer="predictor", error=f"receiving failed: {error}")
                return
            try:
                self.deadline.progressed(decode(frames, expected_kinds=(PredictorProgress,)), time.monotonic())
            except Exception as error:  # one bad message: log it, keep serving
                get_logger().warning("bad_reply", peer="predictor", error=str(error))

    def close(self) -> None:
        self.receiver.cancel()
        self.observe.close(linger=0)
        self.progress.close(linger=0)
