"""The router's per-worker deadlines on work in hand (`mer.router.work_deadlines`), on a given clock."""

from __future__ import annotations

import pytest

from mer.router.work_deadlines import Overdue, WorkDeadlines, progress_interval_s

DEADLINE_S = 2.0
STEP_S = progress_interval_s(DEADLINE_S)  # 0.4: checks on time, so no deaf time is subtracted


def checked_until(deadlines: WorkDeadlines, start: float, end: float) -> list[tuple[float, Overdue]]:
    """Run `overdue` every STEP_S from `start` to `end`; every finding with the time it was made."""
    found, now = [], start
    while now <= end + 1e-9:
        found += [(now, overdue) for overdue in deadlines.overdue(now)]
        now += STEP_S
    return found


def test_the_interval_is_a_fifth_of_the_deadline_and_at_most_a_second():
    assert progress_interval_s(2.0) == pytest.approx(0.4)
    assert progress_interval_s(10.0) == 1.0


def test_a_worker_with_a_job_and_no_progress_is_overdue_once_after_the_deadline():
    deadlines = WorkDeadlines(DEADLINE_S)
    deadlines.hello(0, 0.0)
    deadlines.sent(0, 7, 0.0)
    found = checked_until(deadlines, 0.0, 10.0)
    assert len(found) == 1  # reported once, not at every check
    seen_at, overdue = found[0]
    assert DEADLINE_S < seen_at <= DEADLINE_S + STEP_S + 1e-9
    assert overdue == Overdue(0, pytest.approx(seen_at), 1, 7)


def test_an_idle_worker_is_never_overdue_and_its_first_job_starts_the_deadline():
    deadlines = WorkDeadlines(DEADLINE_S)
    deadlines.hello(0, 0.0)
    assert checked_until(deadlines, 0.0, 30.0) == []  # long idle: nothing in hand
    deadlines.sent(0, 1, 30.0)
    (found,) = checked_until(deadlines, 30.0 + STEP_S, 40.0)
    assert found[0] > 30.0 + DEADLINE_S and found[1].silent_s == pytest.approx(found[0] - 30.0)


def test_progress_and_answers_keep_a_long_job_alive():
    deadlines = WorkDeadlines(DEADLINE_S)
    deadlines.hello(0, 0.0)
    deadlines.sent(0, 1, 0.0)
    now = 0.0
    for _ in range(50):  # a job of 50 progress reports, each 1.5 s apart: 75 s in all
        now += STEP_S
        assert deadlines.overdue(now) == []
        now += STEP_S
        assert deadlines.overdue(now) == []
        now += STEP_S
        assert deadlines.overdue(now) == []
        deadlines.progressed(0, now + 0.1)
    deadlines.answered(0, 1, now)
    assert deadlines.in_hand(0) == []
    assert checked_until(deadlines, now, now + 20.0) == []


def test_a_job_queued_behind_another_does_not_restart_the_deadline():
    deadlines = WorkDeadlines(DEADLINE_S)
    deadlines.hello(0, 0.0)
    deadlines.sent(0, 1, 0.0)
    deadlines.sent(0, 2, 1.5)  # queued: the worker has shown nothing since 0.0
    (found,) = checked_until(deadlines, 0.0, 5.0)
    assert found[0] <= DEADLINE_S + STEP_S + 1e-9
    assert (found[1].in_hand, found[1].job_id) == (2, 1)
    deadlines.answered(0, 1, 5.0)  # answers make progress; one job still in hand
    assert deadlines.in_hand(0) == [2]
    deadlines.hello(0, 5.0)
    deadlines.sent(0, 3, 5.0)
    deadlines.sent(0, 4, 5.0)
    deadlines.answered(0, 4, 5.5)  # answered out of order: the oldest job left is the one named
    (found,) = checked_until(deadlines, 5.0 + STEP_S, 10.0)
    assert (found[1].in_hand, found[1].job_id) == (1, 3)


def test_workers_are_judged_apart_and_a_hello_starts_anew():
    deadlines = WorkDeadlines(DEADLINE_S)
    deadlines.hello(0, 0.0)
    deadlines.hello(1, 0.0)
    deadlines.sent(0, 1, 0.0)
    deadlines.sent(1, 2, 0.0)
    now = 0.0
    found = []
    while now < 6.0:
        now += STEP_S
        deadlines.progressed(1, now)  # worker 1 works, worker 0 is stuck
        found += deadlines.overdue(now)
    assert [overdue.worker for overdue in found] == [0]
    deadlines.answered(1, 2, now)
    deadlines.hello(0, now)  # its replacement: nothing in hand, may be reported again
    assert deadlines.in_hand(0) == []
    deadlines.sent(0, 1, now)
    assert [overdue.worker for _, overdue in checked_until(deadlines, now, now + 5.0)] == [0]


def test_time_the_router_was_not_listening_does_not_count():
    deadlines = WorkDeadlines(DEADLINE_S)
    deadlines.hello(0, 0.0)
    deadlines.sent(0, 1, 0.0)
    assert deadlines.overdue(STEP_S) == []
    # the router's loop was busy for 10 s (a long dense layer): progress messages waited unread
    assert deadlines.overdue(STEP_S + 10.0) == []
    deadlines.progressed(0, STEP_S + 10.0 + 0.01)  # read as soon as the loop turned
    assert checked_until(deadlines, 2 * STEP_S + 10.0, 2 * STEP_S + 10.0 + DEADLINE_S - STEP_S) == []
    # ... but a worker that really is stuck is still named, a deadline after the router listens again
    (found,) = checked_until(deadlines, 2 * STEP_S + 10.0, 30.0)
    assert found[0] <= STEP_S + 10.0 + DEADLINE_S + 2 * STEP_S + 1e-9
