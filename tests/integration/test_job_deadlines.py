"""Per-job deadlines: a compute worker, the I/O worker or the predictor spinning in a busy loop (it uses
CPU, so the stall watch cannot see it) is named stuck by the router within `job_deadline_s` plus one
check, killed and restarted, its work sent again (hints resume, for the predictor) and the tokens
identical to mer's single-process generation; long work that reports its progress (between items, and
between chunks of one item's rows) never trips the deadline; with no restart left the run ends naming
the worker and job.

Real `mer-pipeline generate` and `run` processes; the faults are injected with `MER_WORK_FAULTS`
(`mer.environment`): `spin:WORKER:JOB` (a busy loop in that job, `Acquire` or observation of the worker's
first process: a compute worker's number, `io` or `predictor`),
`slow:SECONDS` (every item of every job that much longer, busy, progress reported between items),
`slow_row:SECONDS` (every row that much longer, busy, progress reported between chunks of rows). The
leak guard of `tests/conftest.py` checks that nothing of a run is left. The log's `t_mono` is
`time.monotonic()`, one clock for every process.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from mer.compute.batches import PROGRESS_CHUNK_ROWS
from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.models import tiny_model_path
from tests.support.generate_runs import generate_argv
from tests.support.pipeline_runs import PipelineRun, RunningPipeline, process_title, run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

DEADLINE_S = 2.0
CHECK_INTERVAL_S = 0.4  # progress_interval_s(2.0): the router checks this often
DETECTION_SLACK_S = 1.5  # a busy 2-core machine: the router's check may run late
STUCK_EXIT = r"stuck: no progress on {kind} (\d+)( \(\d+ in hand\))? for (\d+\.\d) s \(job_deadline_s ([\d.]+) s\)"


def events_named(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event.get("event") == name]


def generation(leak_guard, tmp_path, faults: str, prompt: str, steps: int, *flags,
               cache_slots: int = 8, env: dict | None = None) -> tuple[PipelineRun, list[int]]:
    """A generation of the embedded model with `MER_WORK_FAULTS=faults` (and `env`), run to its end: (the
    run, the tokens of mer's single-process generation of the same prompt)."""
    model = tiny_model_path()
    log_path = tmp_path / "generate.jsonl"
    argv = generate_argv(model, "--prompt", prompt, "-n", steps, "--ignore-eos", "--compute-workers", 2,
                         "--cache-slots", cache_slots, *flags, log_path=log_path)
    run = RunningPipeline.of_argv(leak_guard, argv, log_path, env={
        **os.environ, "MER_CACHE_DIR": str(tmp_path / "cache"), "MER_WORK_FAULTS": faults, **(env or {})})
    try:
        result = run.finish()
    finally:
        run.kill_if_running()
    assert result.returncode == 0, result.stderr
    reference = MoEModel.load(model)
    prompt_tokens = json.loads(result.stdout)["prompt_tokens"]
    expected = generate(reference, prompt_tokens, steps, Sampler(), GGUFExperts(reference.source), ignore_eos=True)
    return result, expected.tokens


def test_a_compute_worker_spinning_forever_is_named_within_the_deadline_restarted_and_the_tokens_are_identical(
        leak_guard, tmp_path):
    result, expected = generation(leak_guard, tmp_path, "spin:0:30", "def ", 40, "--job-deadline-s", DEADLINE_S)
    events = result.events
    (injected,) = events_named(events, "work_fault_injected")
    (stuck,) = events_named(events, "child_stuck")
    (reported,) = events_named(events, "worker_stuck")
    spun_at, spinner = injected["t_mono"], injected["pid"]
    assert stuck["child"].startswith("mer-compute-0-") and stuck["child_pid"] == spinner
    # named with the job it spins in, within the deadline plus one check of the router
    assert reported["work"] == stuck["work"] and re.fullmatch(rf"compute job {injected['job_id']}( \(\d+ in hand\))?",
                                                              stuck["work"])
    assert DEADLINE_S < stuck["silent_s"] <= DEADLINE_S + CHECK_INTERVAL_S + DETECTION_SLACK_S, stuck
    assert stuck["t_mono"] - spun_at <= DEADLINE_S + CHECK_INTERVAL_S + DETECTION_SLACK_S
    print(f"busy loop in compute job {injected['job_id']}: named stuck {stuck['t_mono'] - spun_at:.2f} s after it "
          f"began (silent {stuck['silent_s']} s)")
    assert events_named(events, "child_stalled") == []  # it used CPU: the stall watch could not see it
    (restarted,) = events_named(events, "child_restarted")
    assert restarted["child"] == stuck["child"] and restarted["dead_pid"] == spinner != restarted["child_pid"]
    match = re.fullmatch(STUCK_EXIT.format(kind="compute job") + "; killed by the watchdog", restarted["exit"])
    assert match and int(match.group(1)) == injected["job_id"], restarted["exit"]
    (recovered,) = events_named(events, "child_recovered")
    assert recovered["child_pid"] == restarted["child_pid"]
    (resubmitted,) = events_named(events, "compute_jobs_resubmitted")
    assert resubmitted["worker"] == 0 and injected["job_id"] in resubmitted["job_ids"]
    assert process_title(spinner) == ""  # the spinning process was killed, not left behind
    assert json.loads(result.stdout)["tokens"] == expected


def test_long_jobs_that_report_progress_never_trip_the_deadline(leak_guard, pipeline_stores, tmp_path, monkeypatch):
    """A layered benchmark whose every token uses all 8 experts of each layer, all cached after the first
    token: each job then holds 8 items, and every item is made 0.15 s longer, busy on the CPU. Jobs last
    more than twice the deadline of 0.5 s, but the worker reports progress between items."""
    deadline_s = 0.5
    store = pipeline_stores["tiny"]
    flags = ("--tokens", 2, "--layered", "--top-k", 8, "--cache-slots", 16, "--compute-workers", 2,
             "--job-deadline-s", deadline_s)
    undisturbed = tmp_path / "undisturbed.npy"
    run_pipeline(leak_guard, store, *flags, "--dump-outputs", undisturbed, workdir=tmp_path).check_ok()
    monkeypatch.setenv("MER_WORK_FAULTS", "slow:0.15")
    slowed = tmp_path / "slowed.npy"
    result = run_pipeline(leak_guard, store, *flags, "--dump-outputs", slowed, workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    events = result.events
    longest = max(event["t_end"] - event["t_start"] for event in events_named(events, "compute_job"))
    print(f"longest compute job {longest:.2f} s with job_deadline_s {deadline_s} s")
    assert longest > 2 * deadline_s
    assert events_named(events, "child_stuck") == events_named(events, "worker_stuck") == []
    assert events_named(events, "child_restarted") == []
    assert np.load(slowed).tobytes() == np.load(undisturbed).tobytes()


def test_a_read_slower_than_the_job_deadline_is_never_called_stuck(leak_guard, pipeline_stores, tmp_path,
                                                                    monkeypatch):
    """A device that answers late: the first read of expert 11 is handed to the kernel 2.5 s after it
    started (`MER_READ_FAULTS=hang:11:1:2.5`), more than twice the job deadline of 1 s but within the read
    deadline of 15 s. Without prefetch the read is a miss, so the router waits on that `Acquire` the whole
    time; the I/O worker's loop reports progress meanwhile, so nothing is stuck: exit 0, no
    `worker_stuck`/`child_stuck`/restart, and the outputs of an undisturbed run byte for byte."""
    deadline_s, delay_s, slow_expert = 1.0, 2.5, 11
    store = pipeline_stores["tiny"]
    flags = ("--tokens", 40, "--workload", "uniform", "--cache-slots", 4, "--compute-workers", 1, "--no-prefetch",
             "--job-deadline-s", deadline_s, "--read-deadline-s", 15)
    undisturbed = tmp_path / "undisturbed.npy"
    run_pipeline(leak_guard, store, *flags, "--dump-outputs", undisturbed, workdir=tmp_path).check_ok()
    monkeypatch.setenv("MER_READ_FAULTS", f"hang:{slow_expert}:1:{delay_s}")
    delayed = tmp_path / "delayed.npy"
    result = run_pipeline(leak_guard, store, *flags, "--dump-outputs", delayed, workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    events = result.events
    slow_reads = [event for event in events_named(events, "expert_read") if event["expert_id"] == slow_expert]
    assert slow_reads and slow_reads[0]["kind"] == "foreground", slow_reads
    print(f"the slow read took {slow_reads[0]['latency_us'] / 1e6:.2f} s with job_deadline_s {deadline_s} s")
    assert slow_reads[0]["latency_us"] >= delay_s * 1e6
    assert events_named(events, "read_hung") == []
    assert events_named(events, "child_stuck") == events_named(events, "worker_stuck") == []
    assert events_named(events, "child_restarted") == events_named(events, "child_stalled") == []
    assert np.load(delayed).tobytes() == np.load(undisturbed).tobytes()


@pytest.mark.heavy
def test_one_expert_on_more_rows_than_the_deadline_allows_reports_progress_between_chunks_and_is_never_stuck(
        leak_guard, tmp_path):
    """A prefill of 221 tokens: an expert gets up to 178 of its rows in one item, and `slow_row:0.008` makes
    every row 8 ms longer, busy on the CPU (a slow kernel): one item alone lasts longer than the deadline of
    0.6 s, but the worker reports progress between chunks of `PROGRESS_CHUNK_ROWS` rows (0.26 s each)."""
    deadline_s, slow_row_s = 0.6, 0.008
    prompt = " ".join(f"def f{i}(x): return x + {i}" for i in range(23))
    result, expected = generation(leak_guard, tmp_path, f"slow_row:{slow_row_s}", prompt, 3,
                                  "--job-deadline-s", deadline_s)
    events = result.events
    assert PROGRESS_CHUNK_ROWS * slow_row_s < deadline_s
    longest_item_rows = max(event["max_item_rows"] for event in events_named(events, "compute_job"))
    print(f"largest item: {longest_item_rows} rows, at least {longest_item_rows * slow_row_s:.2f} s with "
          f"job_deadline_s {deadline_s} s")
    assert longest_item_rows * slow_row_s > deadline_s  # one item's injected time alone is beyond the deadline
    assert events_named(events, "child_stuck") == events_named(events, "worker_stuck") == []
    assert events_named(events, "child_restarted") == []
    assert json.loads(result.stdout)["tokens"] == expected


@pytest.mark.heavy
def test_a_first_numba_compile_never_trips_a_deadline(leak_guard, tmp_path):
    """A generation with an empty numba cache (`NUMBA_CACHE_DIR`): every child compiles its kernels, for
    longer than the job deadline of 1 s and the stall timeout of 2 s, yet no child is named stuck or
    stalled: compute workers compile before they are ready (deadlines count from there), and a compile
    uses CPU (the stall watch sees it)."""
    deadline_s, stall_s = 1.0, 2.0
    numba_cache = tmp_path / "numba-cache"
    numba_cache.mkdir()
    result, expected = generation(leak_guard, tmp_path, "", "def ", 20, "--job-deadline-s", deadline_s,
                                  "--stall-timeout-s", stall_s, env={"NUMBA_CACHE_DIR": str(numba_cache)})
    events = result.events
    warm_ups = [event["warm_up_s"] for event in events_named(events, "child_ready")
                if "warm_up_s" in event and event.get("child", "").startswith("mer-compute-")]
    print(f"compute workers' kernel warm-up with an empty numba cache: {warm_ups} s; job_deadline_s {deadline_s} s")
    assert len(warm_ups) == 2 and min(warm_ups) > deadline_s  # each compiled for longer than the deadline
    assert list(numba_cache.rglob("*.nbi"))  # compiled, not loaded from any other cache
    for name in ("child_stuck", "worker_stuck", "child_stalled", "child_restarted"):
        assert events_named(events, name) == [], name
    assert json.loads(result.stdout)["tokens"] == expected


def test_a_stuck_compute_worker_without_restarts_ends_the_run_naming_it_and_its_job(
        leak_guard, pipeline_stores, tmp_path, monkeypatch):
    monkeypatch.setenv("MER_WORK_FAULTS", "spin:0:20")
    result = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 2000, "--cache-slots", 4,
                          "--compute-workers", 1, "--max-restarts", 0, "--job-deadline-s", 1, workdir=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    (injected,) = events_named(result.events, "work_fault_injected")
    last_line = result.stderr.strip().splitlines()[-1]
    pattern = (r"mer-pipeline run: error: (mer-compute-0-\w+) \(pid (\d+)\) died: "
               + STUCK_EXIT.format(kind="compute job")
               + r"; killed by the watchdog \(after 0 restarts, max_restarts\)")
    match = re.fullmatch(pattern, last_line)
    assert match, last_line
    assert int(match.group(2)) == injected["pid"] and int(match.group(3)) == injected["job_id"]
    assert float(match.group(6)) == 1.0
    assert events_named(result.events, "child_restarted") == []


def test_an_io_worker_spinning_forever_is_named_within_the_deadline_restarted_and_the_tokens_are_identical(
        leak_guard, tmp_path):
    """The I/O worker's event loop sends `IoProgress` while an `Acquire` is unanswered; spinning in a busy
    loop, it sends nothing: named stuck, killed, restarted (the router fails its acquires over to the new
    worker), and the tokens are those of mer's single-process generation."""
    result, expected = generation(leak_guard, tmp_path, "spin:io:40", "def ", 40, "--job-deadline-s", DEADLINE_S)
    events = result.events
    (injected,) = events_named(events, "work_fault_injected")
    (stuck,) = events_named(events, "child_stuck")
    spun_at, spinner = injected["t_mono"], injected["pid"]
    assert stuck["child"].startswith("mer-io-") and stuck["child_pid"] == spinner
    assert re.fullmatch(rf"I/O request {injected['request_id']}( \(\d+ in hand\))?", stuck["work"]), stuck
    assert DEADLINE_S < stuck["silent_s"] <= DEADLINE_S + CHECK_INTERVAL_S + DETECTION_SLACK_S, stuck
    assert stuck["t_mono"] - spun_at <= DEADLINE_S + CHECK_INTERVAL_S + DETECTION_SLACK_S
    print(f"busy loop in the I/O worker's request {injected['request_id']}: named stuck "
          f"{stuck['t_mono'] - spun_at:.2f} s after it began (silent {stuck['silent_s']} s)")
    assert events_named(events, "child_stalled") == []
    (restarted,) = events_named(events, "child_restarted")
    assert restarted["child"] == stuck["child"] and restarted["dead_pid"] == spinner != restarted["child_pid"]
    assert re.fullmatch(STUCK_EXIT.format(kind="I/O request") + "; killed by the watchdog", restarted["exit"])
    (failover,) = events_named(events, "io_failover")
    (lifted,) = events_named(events, "io_fence_lifted")
    assert restarted["t_mono"] <= failover["t_mono"] <= lifted["t_mono"]
    assert process_title(spinner) == ""
    assert json.loads(result.stdout)["tokens"] == expected


@pytest.mark.heavy
def test_a_spinning_predictor_is_named_within_the_deadline_restarted_its_hints_resume_and_the_tokens_are_identical(
        leak_guard, tmp_path):
    """The predictor's event loop reports the observations it consumed (`PredictorProgress`); spinning in a
    busy loop from its 8th observation (the prefill's), it reports nothing while the router's observations
    keep coming: named stuck, killed and restarted; the router never waited for it (tokens flow while it
    spins), the new predictor's hints are read by the I/O worker, and the tokens are those of mer's
    single-process generation. Every compute item is made 5 ms longer (`slow:0.005`) so that the
    generation outlasts the deadline and the restart by several seconds; 4 slots make the hints matter."""
    result, expected = generation(leak_guard, tmp_path, "spin:predictor:8,slow:0.005", "def ", 240,
                                  "--job-deadline-s", DEADLINE_S, cache_slots=4)
    events = result.events
    (injected,) = events_named(events, "work_fault_injected")
    (stuck,) = events_named(events, "child_stuck")
    (reported,) = events_named(events, "worker_stuck")
    spun_at, spinner = injected["t_mono"], injected["pid"]
    assert injected["process"].startswith("mer-predictor-") and injected["observation"] == 8
    assert stuck["child"] == injected["process"] and stuck["child_pid"] == spinner
    assert reported["work"] == stuck["work"] and re.fullmatch(r"observation \d+( \(\d+ in hand\))?", stuck["work"])
    assert DEADLINE_S < stuck["silent_s"] <= DEADLINE_S + CHECK_INTERVAL_S + DETECTION_SLACK_S, stuck
    assert stuck["t_mono"] - spun_at <= DEADLINE_S + CHECK_INTERVAL_S + DETECTION_SLACK_S
    print(f"busy loop in the predictor's observation 8: named stuck {stuck['t_mono'] - spun_at:.2f} s after it "
          f"began (silent {stuck['silent_s']} s, {reported['in_hand']} observations in hand)")
    assert events_named(events, "child_stalled") == []  # it used CPU: the stall watch could not see it
    tokens = events_named(events, "generation_token")
    while_spinning = [event for event in tokens if spun_at < event["t_mono"] < stuck["t_mono"]]
    assert len(while_spinning) >= 10  # the router's token path never waited for the predictor
    (restarted,) = events_named(events, "child_restarted")
    assert restarted["child"] == stuck["child"] and restarted["dead_pid"] == spinner != restarted["child_pid"]
    assert re.fullmatch(STUCK_EXIT.format(kind="observation") + "; killed by the watchdog", restarted["exit"])
    (recovered,) = events_named(events, "child_recovered")
    assert recovered["child_pid"] == restarted["child_pid"]
    # the hints of the new predictor: prefetch reads the I/O worker started after it was ready
    resumed = [event for event in events_named(events, "expert_read")
               if event["kind"] == "prefetch" and event["t_submit"] > recovered["t_mono"]]
    tokens_after = [event for event in tokens if event["t_mono"] > recovered["t_mono"]]
    assert len(tokens_after) >= 80, len(tokens_after)  # restarted well before the end
    assert len(resumed) >= len(tokens_after) // 10, (len(resumed), len(tokens_after))
    print(f"predictor restarted in {recovered['seconds']} s; {len(resumed)} prefetch reads over the "
          f"{len(tokens_after)} tokens after it")
    assert events_named(events, "compute_jobs_resubmitted") == events_named(events, "io_failover") == []
    assert process_title(spinner) == ""  # the spinning process was killed, not left behind
    assert json.loads(result.stdout)["tokens"] == expected
