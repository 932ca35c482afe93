"""Children stopped or killed mid-run: the watchdog names a stalled child within its bound, the
supervisor restarts compute workers, the predictor and the I/O worker, and the run's outputs are
bit-identical to an undisturbed run's; a stall of a child that cannot be restarted (the router) ends
the run naming it, and so does a death with no restart left.

Real `mer-pipeline run` and `generate` processes, real SIGSTOP and SIGKILL through the pids the log
names; the leak guard of `tests/conftest.py` checks that no process, /dev/shm segment or runtime
directory is left after each test. Times are compared on one clock: the log's `t_mono` is
`time.monotonic()`, the same system-wide clock as the test's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import numpy as np
import pytest

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.models import tiny_model_path
from tests.support.generate_runs import generate_argv
from tests.support.pipeline_runs import RunningPipeline, process_title, run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

STALL_EXIT = r"stalled: no heartbeat, CPU time or I/O for (\d+\.\d) s \(process stopped\); killed by the watchdog"
STALL_TIMEOUT_S = 2.0
CHECK_INTERVAL_S = 0.4  # heartbeat_interval_s(2.0)
DETECTION_SLACK_S = 1.5  # a busy 2-core machine: the supervisor's check may run late
TOKENS = 1500  # about 7 s of the benchmark on the tiny store
BENCH_FLAGS = ("--tokens", TOKENS, "--cache-slots", 4, "--compute-workers", 2, "--stall-timeout-s", STALL_TIMEOUT_S)
IO_BENCH_TOKENS = 500  # the I/O worker restarts in well under a second: a shorter run still kills it mid-run
IO_BENCH_FLAGS = ("--tokens", IO_BENCH_TOKENS, *BENCH_FLAGS[2:])


def events_named(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event.get("event") == name]


def undisturbed_outputs(leak_guard, store, tmp_path, flags=BENCH_FLAGS) -> np.ndarray:
    dump = tmp_path / f"undisturbed-{uuid.uuid4().hex[:8]}.npy"
    run_pipeline(leak_guard, store, *flags, "--dump-outputs", dump, workdir=tmp_path).check_ok()
    return np.load(dump)


def flowing(run: RunningPipeline, event: str, count: int) -> RunningPipeline:
    """`run` once its log holds `count` events `event` (killed if that fails)."""
    try:
        run.wait_for_event(event, count=count)
    except BaseException:
        run.kill_if_running()
        raise
    return run


def signal_child(run: RunningPipeline, child_prefix: str, number: signal.Signals):
    """Send `number` to the run's child named `child_prefix...` and wait for the run's end:
    (child name, pid, when it was sent, the finished run)."""
    try:
        name, pid = run.child_pid(child_prefix)
        sent_at = time.monotonic()
        os.kill(pid, number)
        return name, pid, sent_at, run.finish()
    finally:
        run.kill_if_running()


def restart_of(events: list[dict], name: str, exit_pattern: str) -> tuple[dict, dict]:
    """The one `child_restarted` (of `name`, its `exit` matching `exit_pattern`) and `child_recovered` of a run."""
    (restarted,) = events_named(events, "child_restarted")
    assert restarted["child"] == name and re.fullmatch(exit_pattern, restarted["exit"]), restarted
    (recovered,) = events_named(events, "child_recovered")
    assert recovered["child"] == name and recovered["child_pid"] == restarted["child_pid"]
    return restarted, recovered


def start_bench(leak_guard, store, tmp_path, *flags,
                bench_flags=BENCH_FLAGS) -> tuple[RunningPipeline, os.PathLike]:
    dump = tmp_path / f"disturbed-{uuid.uuid4().hex[:8]}.npy"
    run = RunningPipeline(leak_guard, store, *bench_flags, "--dump-outputs", dump, *flags, workdir=tmp_path)
    return flowing(run, "token_done", 50), dump


@pytest.mark.heavy
def test_a_stopped_compute_worker_is_named_within_the_bound_restarted_and_the_outputs_are_identical(
        leak_guard, pipeline_stores, tmp_path):
    store = pipeline_stores["tiny"]
    run, dump = start_bench(leak_guard, store, tmp_path)
    name, pid, stopped_at, result = signal_child(run, "mer-compute-1-", signal.SIGSTOP)
    assert result.returncode == 0, result.stderr
    events = result.events
    (stalled,) = events_named(events, "child_stalled")
    assert stalled["child"] == name and stalled["child_pid"] == pid and stalled["state"] == "stopped"
    assert STALL_TIMEOUT_S <= stalled["silent_s"] <= STALL_TIMEOUT_S + CHECK_INTERVAL_S + DETECTION_SLACK_S, stalled
    assert stalled["t_mono"] - stopped_at <= STALL_TIMEOUT_S + CHECK_INTERVAL_S + DETECTION_SLACK_S
    print(f"SIGSTOP of {name}: stall seen {stalled['t_mono'] - stopped_at:.2f} s after the stop")
    restarted, _ = restart_of(events, name, STALL_EXIT)
    assert abs(float(re.fullmatch(STALL_EXIT, restarted["exit"]).group(1)) - stalled["silent_s"]) <= 0.051
    assert restarted["dead_pid"] == pid != restarted["child_pid"]
    assert process_title(pid) == ""  # the stopped process was killed, not left behind
    disturbed = np.load(dump)
    assert disturbed.tobytes() == undisturbed_outputs(leak_guard, store, tmp_path).tobytes()


def test_kill_9_of_the_predictor_restarts_it_and_its_hints_resume(leak_guard, pipeline_stores, tmp_path):
    store = pipeline_stores["tiny"]
    run, dump = start_bench(leak_guard, store, tmp_path)
    name, _, _, result = signal_child(run, "mer-predictor-", signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    events = result.events
    _, recovered = restart_of(events, name, "killed by SIGKILL")
    # the hints of the new predictor: prefetch reads the I/O worker started after it was ready
    resumed = [event for event in events_named(events, "expert_read")
               if event["kind"] == "prefetch" and event["t_submit"] > recovered["t_mono"]]
    tokens_after = [event for event in events_named(events, "token_done") if event["t_start_s"] > recovered["t_mono"]]
    assert len(tokens_after) >= 100, len(tokens_after)  # the restart happened well before the end
    assert len(resumed) >= len(tokens_after) // 10, (len(resumed), len(tokens_after))
    print(f"predictor restarted in {recovered['seconds']} s; {len(resumed)} prefetch reads over the "
          f"{len(tokens_after)} tokens after it")
    assert np.load(dump).tobytes() == undisturbed_outputs(leak_guard, store, tmp_path).tobytes()


def test_kill_9_of_a_compute_worker_mid_generation_restarts_it_and_the_tokens_are_identical(leak_guard, tmp_path):
    model = tiny_model_path()
    steps = 120
    log_path = tmp_path / "generate.jsonl"
    argv = generate_argv(model, "--prompt", "def ", "-n", steps, "--ignore-eos", "--compute-workers", 2,
                         "--cache-slots", 8, log_path=log_path)
    run = RunningPipeline.of_argv(leak_guard, argv, log_path,
                                  env={**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")})
    name, _, _, result = signal_child(flowing(run, "generation_token", 5), "mer-compute-0-", signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    events = result.events
    restarted, _ = restart_of(events, name, "killed by SIGKILL")
    lost = resubmitted_jobs(events, restarted, worker=0)
    print(f"{len(lost)} jobs the dead compute worker had in hand (or was sent while down) sent again")
    generated = [event for event in events_named(events, "generation_token")]
    after = [event for event in generated if event["t_mono"] > restarted["t_mono"]]
    assert len(after) >= steps // 2, len(after)  # killed mid-generation
    print(f"compute worker restarted mid-generation; {len(after)} of {steps} tokens after it")
    tokens = json.loads(result.stdout)["tokens"]
    reference = MoEModel.load(model)
    prompt = json.loads(result.stdout)["prompt_tokens"]
    assert tokens == generate(reference, prompt, steps, Sampler(), GGUFExperts(reference.source),
                              ignore_eos=True).tokens


def resubmitted_jobs(events: list[dict], restarted: dict, worker: int) -> set[int]:
    """The jobs the router sent again to the restarted compute worker `worker` on its `Hello`: the one
    `compute_jobs_resubmitted` (logged at every restart, with no job ids when the dead process had none
    in hand), each of its jobs computed by the new process."""
    (resubmitted,) = events_named(events, "compute_jobs_resubmitted")
    assert resubmitted["worker"] == worker and resubmitted["t_mono"] >= restarted["t_mono"], resubmitted
    computed_by_new = {event["job_id"] for event in events_named(events, "compute_job")
                       if event["pid"] == restarted["child_pid"]}
    lost = set(resubmitted["job_ids"])
    assert lost <= computed_by_new, (lost, computed_by_new)
    return lost


@pytest.mark.heavy
def test_kill_9_of_a_compute_worker_with_a_job_in_hand_in_a_benchmark_resends_its_jobs_and_the_outputs_are_identical(
        leak_guard, pipeline_stores, tmp_path, monkeypatch):
    """A benchmark (`run --dump-outputs`) whose compute worker 0 is killed while it certainly holds a job:
    its first process spins in its 40th job (`MER_WORK_FAULTS=spin:0:40`, a busy loop that holds the job
    and reports nothing; the job deadline, 8 s by default, is never reached) and gets SIGKILL as soon as
    the log says so. The supervisor restarts it, the router sends that job (and any other it had) again
    to the new process, and the dumped outputs equal an undisturbed run's byte for byte."""
    store = pipeline_stores["tiny"]
    flags = ("--tokens", IO_BENCH_TOKENS, *BENCH_FLAGS[2:])
    monkeypatch.setenv("MER_WORK_FAULTS", "spin:0:40")
    dump = tmp_path / "disturbed.npy"
    run = RunningPipeline(leak_guard, store, *flags, "--dump-outputs", dump, workdir=tmp_path)
    try:
        (injected,) = run.wait_for_event("work_fault_injected")
        name, pid = run.child_pid("mer-compute-0-")
        assert injected["pid"] == pid
        os.kill(pid, signal.SIGKILL)
        result = run.finish()
    finally:
        run.kill_if_running()
    assert result.returncode == 0, result.stderr
    events = result.events
    restarted, recovered = restart_of(events, name, "killed by SIGKILL")
    assert restarted["dead_pid"] == pid
    assert events_named(events, "child_stuck") == events_named(events, "worker_stuck") == []
    lost = resubmitted_jobs(events, restarted, worker=0)
    assert injected["job_id"] in lost  # the job in hand when it was killed
    # every job the router ever sent to worker 0 that its first process did not finish
    sent_to_0 = {job_id for event in events_named(events, "decision_done") for job_id, worker in event["jobs"]
                 if worker == 0}
    finished_by_dead = {event["job_id"] for event in events_named(events, "compute_job") if event["pid"] == pid}
    assert lost <= sent_to_0 - finished_by_dead, (lost, sent_to_0 - finished_by_dead)
    print(f"compute worker 0 killed in job {injected['job_id']}; {len(lost)} jobs sent again; "
          f"restarted in {recovered['seconds']} s")
    monkeypatch.delenv("MER_WORK_FAULTS")
    assert np.load(dump).tobytes() == undisturbed_outputs(leak_guard, store, tmp_path, flags).tobytes()


def signal_a_long_run(leak_guard, store, tmp_path, child_prefix: str, number: signal.Signals):
    """Send `number` to a child of a long benchmark (default settings) once its tokens flow:
    (child name, pid, when it was sent, the finished run)."""
    run = RunningPipeline(leak_guard, store, "--tokens", 20_000, "--cache-slots", 4, "--compute-workers", 1,
                          workdir=tmp_path)
    return signal_child(flowing(run, "token_done", 20), child_prefix, number)


def test_a_stalled_router_ends_the_run_within_the_default_bound_naming_it(leak_guard, pipeline_stores, tmp_path):
    """The router cannot be restarted (it holds the job): its stall ends the run, at the default
    stall timeout (8 s) plus one check, under the issue's bound of 10 s."""
    name, pid, stopped_at, result = signal_a_long_run(leak_guard, pipeline_stores["tiny"], tmp_path, "mer-router-",
                                                      signal.SIGSTOP)
    assert result.returncode == 1 and result.stdout == ""
    (stalled,) = events_named(result.events, "child_stalled")
    assert stalled["child"] == name
    assert stalled["t_mono"] - stopped_at <= 10.0, stalled["t_mono"] - stopped_at
    print(f"SIGSTOP of the router: stall seen {stalled['t_mono'] - stopped_at:.2f} s after the stop")
    last_line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(f"mer-pipeline run: error: {name} (pid {pid}) died: ") + STALL_EXIT, last_line)
    assert events_named(result.events, "child_restarted") == []


def io_restart_checked(events: list[dict], name: str, exit_pattern: str) -> tuple[dict, dict]:
    """The I/O worker's one restart in `events`: restarted and recovered, its fence lifted once the router
    dropped the dead worker's leases, and every slot it wrote after that at a generation above the dead
    worker's (a stale reference can never match a rewritten slot)."""
    restarted, recovered = restart_of(events, name, exit_pattern)
    (failover,) = events_named(events, "io_failover")
    (lifted,) = events_named(events, "io_fence_lifted")
    assert failover["restarts"] == lifted["restarts"] == 1
    assert restarted["t_mono"] <= failover["t_mono"] <= lifted["t_mono"]
    new_pid = restarted["child_pid"]
    old_reads = [event for event in events_named(events, "expert_read") if event["pid"] == restarted["dead_pid"]]
    new_reads = [event for event in events_named(events, "expert_read") if event["pid"] == new_pid]
    assert old_reads and new_reads, (len(old_reads), len(new_reads))  # killed mid-run, reads went on
    assert min(event["t_submit"] for event in new_reads) >= lifted["t_mono"]  # nothing written while fenced
    return restarted, recovered


@pytest.mark.heavy
def test_kill_9_of_the_io_worker_mid_run_restarts_it_and_the_outputs_are_identical(
        leak_guard, pipeline_stores, tmp_path):
    """A benchmark whose I/O worker is killed: a new one rebuilds the slot table over the same arena, the
    router's acquires in flight are retried there, and the dumped outputs equal an undisturbed run's."""
    store = pipeline_stores["tiny"]
    run, dump = start_bench(leak_guard, store, tmp_path, bench_flags=IO_BENCH_FLAGS)
    name, pid, _, result = signal_child(run, "mer-io-", signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    restarted, recovered = io_restart_checked(result.events, name, "killed by SIGKILL")
    assert restarted["dead_pid"] == pid
    print(f"I/O worker restarted in {recovered['seconds']} s")
    summary = json.loads(result.stdout)
    assert summary["tokens"] == IO_BENCH_TOKENS
    # the summary's reads are the new worker's (counted from its start), and the run says so
    (noted,) = events_named(result.events, "io_stats_since_restart")
    new_reads = [event for event in events_named(result.events, "expert_read") if event["pid"] == restarted["child_pid"]]
    assert noted["restarts"] == 1 and 0 < summary["reads"] == noted["reads"] <= len(new_reads)
    assert np.load(dump).tobytes() == undisturbed_outputs(leak_guard, store, tmp_path, IO_BENCH_FLAGS).tobytes()


def generation_with_a_signalled_child(leak_guard, tmp_path, child_prefix: str, number: signal.Signals, *flags):
    """A generation of the embedded model (60 tokens) whose child `child_prefix` gets `number` once 5
    tokens are out: (the finished run, the 60 tokens of mer's single-process generation, steps)."""
    model = tiny_model_path()
    steps = 60
    log_path = tmp_path / "generate.jsonl"
    argv = generate_argv(model, "--prompt", "def ", "-n", steps, "--ignore-eos", "--compute-workers", 2,
                         "--cache-slots", 8, *flags, log_path=log_path)
    run = RunningPipeline.of_argv(leak_guard, argv, log_path,
                                  env={**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")})
    name, pid, sent_at, result = signal_child(flowing(run, "generation_token", 5), child_prefix, number)
    assert result.returncode == 0, result.stderr
    reference = MoEModel.load(model)
    prompt = json.loads(result.stdout)["prompt_tokens"]
    expected = generate(reference, prompt, steps, Sampler(), GGUFExperts(reference.source), ignore_eos=True).tokens
    return (name, pid, sent_at, result), expected, steps


def test_kill_9_of_the_io_worker_mid_generation_restarts_it_and_the_tokens_are_identical(leak_guard, tmp_path):
    (name, _, _, result), expected, steps = generation_with_a_signalled_child(
        leak_guard, tmp_path, "mer-io-", signal.SIGKILL)
    restarted, _ = io_restart_checked(result.events, name, "killed by SIGKILL")
    generated = events_named(result.events, "generation_token")
    after = [event for event in generated if event["t_mono"] > restarted["t_mono"]]
    assert len(after) >= steps // 2, len(after)  # killed mid-generation
    assert json.loads(result.stdout)["tokens"] == expected


@pytest.mark.heavy
def test_a_stopped_io_worker_is_restarted_and_the_tokens_are_identical(leak_guard, tmp_path):
    (name, pid, stopped_at, result), expected, _ = generation_with_a_signalled_child(
        leak_guard, tmp_path, "mer-io-", signal.SIGSTOP, "--stall-timeout-s", STALL_TIMEOUT_S)
    (stalled,) = events_named(result.events, "child_stalled")
    assert stalled["child"] == name and stalled["child_pid"] == pid and stalled["state"] == "stopped"
    assert stalled["t_mono"] - stopped_at <= STALL_TIMEOUT_S + CHECK_INTERVAL_S + DETECTION_SLACK_S
    io_restart_checked(result.events, name, STALL_EXIT)
    assert process_title(pid) == ""  # the stopped process was killed, not left behind
    assert json.loads(result.stdout)["tokens"] == expected


def test_kill_9_of_the_io_worker_without_restarts_ends_the_run_naming_it(leak_guard, pipeline_stores, tmp_path):
    """With `--max-restarts 0` the I/O worker's death is a clean abort naming it."""
    run = RunningPipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 20_000, "--cache-slots", 4,
                          "--compute-workers", 1, "--max-restarts", 0, workdir=tmp_path)
    name, pid, killed_at, result = signal_child(flowing(run, "token_done", 20), "mer-io-", signal.SIGKILL)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (f"mer-pipeline run: error: {name} (pid {pid}) died: "
                                                      "killed by SIGKILL (after 0 restarts, max_restarts)")
    assert events_named(result.events, "child_restarted") == []
    assert time.monotonic() - killed_at < 10.0
