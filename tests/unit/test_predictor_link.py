"""The router's deadline on the observations it sends the predictor (`mer.router.predictor_link`): on a
given clock (`ObservationDeadline`), and through real ZeroMQ sockets (`PredictorLink`)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from mer.protocol import PredictorProgress, RoutingObserved, decode, encode
from mer.router.predictor_link import ObservationDeadline, PredictorLink
from mer.router.work_deadlines import Overdue, progress_interval_s

DEADLINE_S = 2.0
STEP_S = progress_interval_s(DEADLINE_S)  # 0.4


def findings(deadline: ObservationDeadline, start: float, end: float, every_step=None) -> list[tuple[float, Overdue]]:
    """`overdue` every STEP_S from `start` to `end` (calling `every_step(now)` first); each finding with its time."""
    found, now = [], start
    while now <= end + 1e-9:
        if every_step is not None:
            every_step(now)
        found += [(now, overdue) for overdue in deadline.overdue(now)]
        now += STEP_S
    return found


def test_an_idle_predictor_is_never_stuck():
    deadline = ObservationDeadline(DEADLINE_S, 0.0)
    assert findings(deadline, 0.0, 20.0) == []


def test_observations_and_no_report_name_the_predictor_once_after_the_deadline_with_what_it_has_in_hand():
    deadline = ObservationDeadline(DEADLINE_S, 0.0)
    deadline.observed(1.0)
    deadline.observed(1.5)
    found = findings(deadline, 0.0, 10.0, every_step=lambda now: deadline.observed(now) if now > 1.5 else None)
    assert len(found) == 1  # once, though observations keep coming
    seen_at, overdue = found[0]
    assert 1.0 + DEADLINE_S < seen_at <= 1.0 + DEADLINE_S + STEP_S + 1e-9
    assert overdue.job_id == 1 and overdue.silent_s == pytest.approx(seen_at - 1.0)
    # the observations sent since the last report, up to then: 2, then one at each check after 1.5 s
    assert overdue.in_hand == 2 + sum(1 for step in range(100) if 1.5 < step * STEP_S <= seen_at + 1e-9)


def test_a_predictor_that_reports_while_behind_is_never_stuck():
    deadline = ObservationDeadline(DEADLINE_S, 0.0)

    def step(now: float) -> None:  # 50 observations per check, a report every second check
        for _ in range(50):
            deadline.observed(now)
        if round(now / STEP_S) % 2 == 0:
            deadline.progressed(PredictorProgress(4242, int(now * 10)), now)

    assert findings(deadline, 0.0, 30.0, every_step=step) == []
    assert deadline.pid == 4242 and deadline.reports > 30


def test_a_report_clears_what_is_in_hand_and_the_next_observation_starts_the_deadline_again():
    deadline = ObservationDeadline(DEADLINE_S, 0.0)
    deadline.observed(0.0)
    deadline.progressed(PredictorProgress(7, 1), 1.0)
    assert deadline.in_hand == 0
    assert findings(deadline, 0.0, 8.0) == []  # nothing sent after the report
    deadline.observed(8.1)
    ((seen_at, overdue),) = findings(deadline, 8.4, 20.0)
    assert 8.1 + DEADLINE_S < seen_at <= 8.1 + DEADLINE_S + STEP_S + 1e-9 and overdue.job_id == 2


def test_after_being_named_a_report_of_its_replacement_starts_it_anew():
    deadline = ObservationDeadline(DEADLINE_S, 0.0)
    deadline.observed(0.0)
    assert len(findings(deadline, 0.0, 3.0)) == 1 and deadline.pid == 0  # never reported: the pid is unknown
    deadline.observed(3.2)  # sent while it restarts: not named again
    assert findings(deadline, 3.2, 6.0) == []
    deadline.progressed(PredictorProgress(99, 2), 6.1)  # the new process consumed what was queued for it
    assert deadline.pid == 99
    deadline.observed(6.2)
    ((seen_at, overdue),) = findings(deadline, 6.4, 12.0)
    assert seen_at > 6.2 + DEADLINE_S and overdue.job_id == 3 and overdue.in_hand == 1


def test_the_link_sends_observations_and_reads_reports_through_real_sockets(tmp_path):
    async def scenario():
        context = zmq.asyncio.Context()
        observe, progress = f"ipc://{tmp_path}/observe.sock", f"ipc://{tmp_path}/predictor_progress.sock"
        predictor_in = context.socket(zmq.PULL)
        predictor_in.bind(observe)
        link = PredictorLink(context, observe, progress, "mer-predictor-0a1b2c3d", job_deadline_s=DEADLINE_S)
        predictor_out = context.socket(zmq.PUSH)
        predictor_out.connect(progress)
        try:
            sent = RoutingObserved(3, 1, [4, 6], [0.75, 0.25])
            await link.send_multipart(encode(sent))
            assert decode(await predictor_in.recv_multipart()) == sent
            assert link.deadline.in_hand == 1 and link.pid == 0
            await predictor_out.send_multipart([b"\x01"])  # malformed: logged, the receiver keeps serving
            await predictor_out.send_multipart(encode(PredictorProgress(4242, 1)))
            for _ in range(200):
                if link.deadline.reports:
                    break
                await asyncio.sleep(0.01)
            assert link.deadline.reports == 1 and link.pid == 4242 and link.deadline.in_hand == 0
            assert link.stuck() == []
        finally:
            link.close()
            for socket in (predictor_in, predictor_out):
                socket.close(linger=0)
            context.term()

    asyncio.run(scenario())
