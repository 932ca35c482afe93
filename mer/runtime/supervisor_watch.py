"""A child's end when its supervisor dies (kill -9, the OOM killer): exit at once, the last one out cleaning up.

Two stages, so that no window is left uncovered:
1. at start-up, before the child holds anything of the run, `die_with_supervisor` asks the kernel
   for SIGKILL on the parent's death (PR_SET_PDEATHSIG) and then checks that the parent is still the
   run's supervisor (it may have died before prctl took effect: the child was then re-parented);
2. once the child is a member of the run (`mer.runtime.membership`), `watch_supervisor` opens a
   pidfd of the supervisor, checks again that it is the parent (so the pidfd is not a reused pid),
   starts a thread that waits on it, and only then clears PR_SET_PDEATHSIG. When the supervisor
   dies the thread leaves the run (the last member removes the run's shared memory and runtime
   directory), logs what it did and exits the process with `EXIT_SUPERVISOR_LOST`. SIGALRM, armed
   first, bounds that work: a child never outlives its supervisor by more than `HARD_EXIT_S`.

The thread waits in poll(2), which releases the GIL: it runs within milliseconds of the death
whatever the event loop is doing, unless native code holds the GIL (the watchdog's business).
"""

from __future__ import annotations

import contextvars
import ctypes
import os
import select
import signal
import threading

from mer.logging_setup import flush_log, get_logger
from mer.runtime.membership import RunMembership

PR_SET_PDEATHSIG = 1
EXIT_SUPERVISOR_LOST = 1
HARD_EXIT_S = 4  # SIGALRM's default action ends the process if leaving takes longer


def set_parent_death_signal(signal_number: int) -> None:
    """This process gets `signal_number` when its parent dies (0: none); OSError if prctl refuses."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_supervisor(supervisor_pid: int) -> None:
    """Stage 1: SIGKILL on the parent's death; exit now if the parent is no longer `supervisor_pid`."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
        os._exit(EXIT_SUPERVISOR_LOST)


def watch_supervisor(supervisor_pid: int, membership: RunMembership) -> threading.Thread | None:
    """Stage 2 (see the module docstring): the watching thread, or None where pidfds are missing
    (PR_SET_PDEATHSIG then stays: the child still dies with its supervisor, without cleaning)."""
    try:
        pidfd = os.pidfd_open(supervisor_pid)
    except ProcessLookupError:
        _leave_and_exit(supervisor_pid, membership)
    except (AttributeError, OSError):  # no pidfd_open (an old kernel or Python)
        return None
    if os.getppid() != supervisor_pid:  # died (and the pid may have been reused) before pidfd_open
        os.close(pidfd)
        _leave_and_exit(supervisor_pid, membership)
    context = contextvars.copy_context()  # the thread logs with this process's bound fields
    thread = threading.Thread(target=context.run, args=(_wait_and_leave, pidfd, supervisor_pid, membership),
                              name="supervisor-watch", daemon=True)
    thread.start()
    set_parent_death_signal(0)
    return thread


def _wait_and_leave(pidfd: int, supervisor_pid: int, membership: RunMembership) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():
        pass
    _leave_and_exit(supervisor_pid, membership)


def leave_run(membership: RunMembership) -> None:
    """Leave the run; the last member out (the supervisor died meanwhile) removes its resources and says so."""
    removed = membership.leave()
    if removed:
        get_logger().warning("run_resources_removed", run_id=membership.run_id, by="last child out",
                             paths=[str(path) for path in removed])


def _leave_and_exit(supervisor_pid: int, membership: RunMembership) -> None:
    signal.alarm(HARD_EXIT_S)
    log = get_logger()
    log.warning("supervisor_lost", supervisor_pid=supervisor_pid)
    leave_run(membership)
    flush_log()
    os._exit(EXIT_SUPERVISOR_LOST)
