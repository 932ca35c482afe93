#!/usr/bin/env python3
"""Soak: kill random compute workers, the predictor and the I/O worker every few seconds while mer
works, and check that nothing is lost, changed or left behind.

1. The benchmark (`mer-pipeline run`) on a synthetic tiny store: once undisturbed, once with kills,
   both dumping their outputs (`--dump-outputs`); a token whose output differs by a single byte
   counts as differing.
2. Generations (`mer-pipeline generate`) of the embedded tiny model, one prompt after another until
   the time is spent, with kills; their tokens are compared with mer's single-process generation of
   the same prompt (which an undisturbed graph run equals token for token:
   tests/e2e/test_generate_default_model.py).

Each kill is a SIGKILL to a random compute worker, the predictor or the I/O worker of the running
graph (pids from the run's log: the latest `child_spawned` of each child once it is ready, so
restarted processes are targets too), at random intervals around `--interval-s`, once the job is
under way; the roles take turns in a random order drawn for each run, so even a few kills a run
reach all three. After each run, whatever of it
is left is a leak: a process titled `mer-...-<run>`, a `/dev/shm/mer-<run>-*` file, a runtime
directory. Prints faults injected, recoveries (`child_recovered`: one per fault made while the job
ran), tokens completed, tokens that differ (must be 0) and leaks (must be 0); exits 1 unless every
run succeeded with none of either and every fault during a job was recovered from.

    python tools/soak.py --seconds 60              # about a minute of faults (plus the references)
    python tools/soak.py --quick --json            # the test's run (tests/integration/test_soak.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mer.runtime.paths import SHM_DIR, runtime_base_dir

MER_PIPELINE = shutil.which("mer-pipeline", path=str(Path(sys.executable).parent)) or "mer-pipeline"
VICTIM_ROLES = ("compute", "predictor", "io")
VICTIM_PREFIXES = tuple(f"mer-{role}-" for role in VICTIM_ROLES)
PROMPTS = ("def ", "import os\n", "class Path(", "    return self.", "for i in range(", "if __name__ == ")
RUN_TIMEOUT_S = 300.0
CALIBRATION_TOKENS = 300


@dataclass
class Tally:
    """What the soak did and found (the printed report)."""

    faults_injected: int = 0
    faults_by_role: dict[str, int] = field(default_factory=dict)  # compute, predictor, io
    faults_after_job: int = 0  # kills whose restarted process the job, done first, no longer needed
    recoveries: int = 0
    tokens_completed: int = 0
    tokens_differing: int = 0
    leaks: list[str] = field(default_factory=list)
    runs: int = 0
    failed_runs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.tokens_differing == 0 and not self.leaks and not self.failed_runs
                and self.recoveries == self.faults_injected - self.faults_after_job)

    def report(self) -> str:
        roles = ", ".join(f"{count} {role}" for role, count in sorted(self.faults_by_role.items()))
        return (f"soak: {self.runs} runs, {self.faults_injected} faults injected ({roles}; {self.faults_after_job} "
                f"after the job was done), {self.recoveries} recoveries, "
                f"{self.tokens_completed} tokens completed, {self.tokens_differing} differing from an undisturbed "
                f"run, {len(self.leaks)} leaks, {len(self.failed_runs)} failed runs")


def read_events(log_path: Path) -> list[dict]:
    events = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written
    return events


class LogFollower:
    """A run's log read as it grows (only the new complete lines each time): whether an event was
    logged, and the compute workers, predictor and I/O worker whose latest process is ready."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.seen: set[str] = set()
        self.latest: dict[str, int] = {}
        self.ready: set[tuple[str, int]] = set()

    def update(self) -> None:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                chunk = file.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                self._take(json.loads(line))
            except json.JSONDecodeError:
                continue

    def _take(self, event: dict) -> None:
        name = event.get("event")
        self.seen.add(name)
        if name == "child_spawned" and str(event["child"]).startswith(VICTIM_PREFIXES):
            self.latest[event["child"]] = int(event["child_pid"])
        if name == "child_ready" and "child" not in event:  # the child's own event
            self.ready.add((event.get("process"), event.get("pid")))

    def victims(self) -> dict[str, int]:
        """{name: pid} of the ready ones (a kill while one is still restarting would only test its start-up again)."""
        return {name: pid for name, pid in self.latest.items() if (name, pid) in self.ready}


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def run_ids(events: list[dict]) -> set[str]:
    return {str(event["run_id"]) for event in events if event.get("event") == "run_started_supervisor"}


def leftovers(run_id: str) -> list[str]:
    """What is left of run `run_id`: processes, /dev/shm files, its runtime directory."""
    left = [f"/dev/shm/{name}" for name in os.listdir(SHM_DIR) if name.startswith(f"mer-{run_id}-")]
    directory = runtime_base_dir() / f"mer-{run_id}"
    if directory.exists():
        left.append(str(directory))
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_alive(int(entry)):
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("mer-") and title.endswith(f"-{run_id}"):
                left.append(f"process {entry} {title}")
    return left


def wait_for_leftovers(run_id: str, timeout_s: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := leftovers(run_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@dataclass
class KillPlan:
    """When to kill: every ~`interval_s` (drawn from 0.5-1.5 times it), at most `per_run` times a run,
    and not after `until` (time.monotonic(): the phase's time is spent, the run ends undisturbed)."""

    rng: random.Random
    interval_s: float
    per_run: int
    until: float = float("inf")
    role_order: list[str] = field(default_factory=list)

    def next_after(self, now: float) -> float:
        return now + self.rng.uniform(0.5, 1.5) * self.interval_s

    def victim(self, alive: list[tuple[str, int]], kills_so_far: int) -> tuple[str, int]:
        """A random one of the ready processes of the next role in turn (the roles in a random order,
        drawn at a run's first kill), so that even a few kills a run reach every role; any ready one when
        none of that role is ready."""
        if kills_so_far == 0:
            self.role_order = self.rng.sample(VICTIM_ROLES, len(VICTIM_ROLES))
        role = self.role_order[kills_so_far % len(VICTIM_ROLES)]
        of_role = [victim for victim in alive if victim_role(victim[0]) == role]
        return self.rng.choice(of_role or alive)


def victim_role(name: str) -> str:
    """`compute`, `predictor` or `io` of a child's name `mer-<role>[-i]-<run>`."""
    return name.split("-")[1]


def run_disturbed(argv: list[str], log_path: Path, plan: KillPlan, tally: Tally,
                  started_event: str, done_event: str) -> subprocess.CompletedProcess:
    """Run `argv` in the background, killing a random victim every ~`interval_s` once `started_event`
    is logged; a kill after `done_event` (the job's summary) counts as after the job."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    next_kill = None
    kills = []
    log = LogFollower(log_path)
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        log.update()
        if next_kill is None:
            if started_event in log.seen:
                next_kill = plan.next_after(time.monotonic())
            continue
        if plan.until > time.monotonic() >= next_kill and len(kills) < plan.per_run:
            alive = sorted((name, pid) for name, pid in log.victims().items() if is_alive(pid))
            if alive:
                name, pid = plan.victim(alive, len(kills))
                os.kill(pid, signal.SIGKILL)
                tally.faults_injected += 1
                role = victim_role(name)
                tally.faults_by_role[role] = tally.faults_by_role.get(role, 0) + 1
                kills.append((name, pid, time.monotonic()))
                print(f"soak: kill -9 {name} (pid {pid})", file=sys.stderr)
            next_kill = plan.next_after(time.monotonic())
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate()
    print(f"soak: {argv[1]} exited {process.returncode} after {len(kills)} kills, "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    count_recoveries(read_events(log_path), [pid for _, pid, _ in kills], done_event, tally)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def count_recoveries(events: list[dict], killed_pids: list[int], done_event: str, tally: Tally) -> None:
    """A kill is recovered from when the process started in its place was ready again; one whose
    replacement was not ready by the job's end (the last tokens needed no more compute) is after the job."""
    restarted = {event["dead_pid"]: event["child_pid"] for event in events if event.get("event") == "child_restarted"}
    recovered = {event["child_pid"] for event in events if event.get("event") == "child_recovered"}
    job_done = any(event.get("event") == done_event for event in events)
    for pid in killed_pids:
        if restarted.get(pid) in recovered:
            tally.recoveries += 1
        elif job_done:
            tally.faults_after_job += 1


def finish_run(name: str, completed: subprocess.CompletedProcess, log_path: Path, tally: Tally) -> list[dict]:
    """Count the run's recoveries, failures and leftovers; its events."""
    events = read_events(log_path)
    tally.runs += 1
    if completed.returncode != 0:
        last = completed.stderr.strip().splitlines()[-1:] or [""]
        tally.failed_runs.append(f"{name}: exit {completed.returncode}: {last[0]}")
    for run_id in run_ids(events):
        tally.leaks += wait_for_leftovers(run_id)
    return events


def bench_argv(store: Path, tokens: int, dump: Path, log_path: Path, max_restarts: int) -> list[str]:
    return [MER_PIPELINE, "run", "--store", str(store), "--tokens", str(tokens), "--cache-slots", "4",
            "--compute-workers", "2", "--dump-outputs", str(dump), "--log-file", str(log_path), "--json",
            "--max-restarts", str(max_restarts)]


def calibrated_tokens(store: Path, workdir: Path, seconds: float) -> int:
    """Benchmark tokens that take about `seconds` here undisturbed, from a short run."""
    log_path = workdir / "calibration.jsonl"
    argv = bench_argv(store, CALIBRATION_TOKENS, workdir / "calibration.npy", log_path, 0)
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if completed.returncode != 0:
        raise SystemExit(f"soak: the calibration run failed: {completed.stderr.strip()}")
    rate = json.loads(completed.stdout)["sustained_tps"]
    return max(CALIBRATION_TOKENS, int(rate * seconds))


def soak_benchmark(workdir: Path, tokens: int, plan: KillPlan, tally: Tally, kill_seconds: float) -> None:
    store = workdir / "store"
    reference_log, disturbed_log = workdir / "bench-reference.jsonl", workdir / "bench-disturbed.jsonl"
    reference = subprocess.run(bench_argv(store, tokens, workdir / "reference.npy", reference_log, 0),
                               capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    finish_run("benchmark (undisturbed)", reference, reference_log, tally)
    argv = bench_argv(store, tokens, workdir / "disturbed.npy", disturbed_log, 1_000_000)
    plan.until = time.monotonic() + kill_seconds
    disturbed = run_disturbed(argv, disturbed_log, plan, tally, "token_done", "run_summary")
    events = finish_run("benchmark", disturbed, disturbed_log, tally)
    tally.tokens_completed += sum(event.get("event") == "token_done" for event in events)
    if reference.returncode == 0 and disturbed.returncode == 0:
        expected, got = np.load(workdir / "reference.npy"), np.load(workdir / "disturbed.npy")
        same = min(len(expected), len(got))
        differing = sum(expected[row].tobytes() != got[row].tobytes() for row in range(same))
        tally.tokens_differing += differing + abs(len(expected) - len(got))


def reference_tokens(prompt: str, steps: int) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of mer's single-process greedy generation on the embedded model."""
    from mer.model.experts import GGUFExperts
    from mer.model.generate import generate
    from mer.model.model import MoEModel
    from mer.model.sampling import Sampler
    from mer.model.tokenizer import load_tokenizer
    from mer.models import tiny_model_path

    model = MoEModel.load(tiny_model_path())
    ids = load_tokenizer(model.source.parts[0]).encode(prompt)
    return ids, generate(model, ids, steps, Sampler(), GGUFExperts(model.source), ignore_eos=True).tokens


def soak_generation(workdir: Path, seconds: float, steps: int, plan: KillPlan, tally: Tally) -> None:
    """Generations with kills, a prompt after another, for `seconds` (at least one; the last one
    started then ends undisturbed)."""
    plan.until = deadline = time.monotonic() + seconds if seconds else float("inf")
    for index in range(10**6):
        prompt = PROMPTS[index % len(PROMPTS)]
        log_path = workdir / f"generate-{index}.jsonl"
        argv = [MER_PIPELINE, "generate", "--prompt", prompt, "-n", str(steps), "--ignore-eos", "--compute-workers",
                "2", "--cache-slots", "8", "--max-restarts", "1000000", "--json", "--log-file", str(log_path)]
        disturbed = run_disturbed(argv, log_path, plan, tally, "generation_token", "generation_summary")
        finish_run(f"generate {prompt!r}", disturbed, log_path, tally)
        if disturbed.returncode == 0:
            result = json.loads(disturbed.stdout)
            prompt_ids, expected = reference_tokens(prompt, steps)
            got = result["tokens"]
            tally.tokens_completed += len(got)
            tally.tokens_differing += sum(a != b for a, b in zip(expected, got)) + abs(len(expected) - len(got))
            if result["prompt_tokens"] != prompt_ids:
                tally.failed_runs.append(f"generate {prompt!r}: prompt ids {result['prompt_tokens']} != {prompt_ids}")
        if time.monotonic() >= deadline or not seconds:
            return


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="time (s) of the faults, half during the benchmark and half during generations; the "
                             "undisturbed references, start-ups and the runs' ends after the last fault come on "
                             "top (default 60)")
    parser.add_argument("--interval-s", type=float, default=2.0,
                        help="mean time (s) between kills, each drawn from 0.5-1.5 times it (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times and victims (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="the test's run: 500 benchmark tokens and one generation of 60 tokens, a kill every "
                             "~1 s, at most 3 a run")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    plan = KillPlan(random.Random(args.seed), 1.0 if args.quick else args.interval_s, 3 if args.quick else 10**9)
    tally = Tally()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mer-soak-") as directory:
        workdir = Path(directory)
        os.environ.setdefault("MER_CACHE_DIR", str(workdir / "cache"))
        subprocess.run([MER_PIPELINE, "synth", "--preset", "tiny", "--out", str(workdir / "store"), "--quiet"],
                       check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
        # undisturbed, the benchmark would take a quarter of the time: restarts stall it meanwhile
        tokens = 500 if args.quick else calibrated_tokens(workdir / "store", workdir, args.seconds / 4)
        soak_benchmark(workdir, tokens, plan, tally, kill_seconds=float("inf") if args.quick else args.seconds / 2)
        soak_generation(workdir, 0 if args.quick else args.seconds / 2, 60 if args.quick else 200, plan, tally)
    figures = {**asdict(tally), "seconds": round(time.monotonic() - started, 1), "seed": args.seed, "ok": tally.ok}
    print(tally.report(), file=sys.stderr)
    for line in tally.leaks + tally.failed_runs:
        print(f"soak:   {line}", file=sys.stderr)
    print(json.dumps(figures) if args.json else tally.report())
    if tally.recoveries != tally.faults_injected - tally.faults_after_job:
        print("soak: a fault during the job was not recovered from", file=sys.stderr)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
