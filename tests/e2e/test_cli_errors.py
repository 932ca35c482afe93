"""Every way a `mer-pipeline` command can go wrong ends in one line on stderr and the documented exit
status (`mer.cli.exit_status`, docs/reliability.md), never a traceback, and leaves nothing behind.

Real processes and files throughout: the console script as a subprocess; a disk that fills up is a
small tmpfs mounted for the test (skipped, with the reason, where mounting is refused); permission
errors are the command run as the unprivileged user `nobody` (skipped where the test is not root); a
closed pipe is a pipe whose reading end is closed before the command starts; signals are real
SIGTERM/SIGINT. Tests that start the process graph are marked slow, and the leak guard of
`tests/conftest.py` checks after each that no process, /dev/shm segment or runtime directory is left.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mer.models import tiny_model_path
from mer.store.demo import converted_store
from mer.store.synth import SynthSpec, synth_store
from tests.support.generate_runs import GENERATE_TIMEOUT_S, generate_argv
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.log_runs import module_runs
from tests.support.pipeline_runs import (HANDSHAKE_TIMEOUT_S, MER_PIPELINE, RunningPipeline, read_json_lines,
                                         run_ids_in_log, run_pipeline)

CLI_TIMEOUT_S = 120
LONG_RUN_TOKENS = 100_000  # minutes of work: the tests below end such a run long before


def mer(*argv, env: dict | None = None, stdout=subprocess.PIPE, user: list[str] | None = None,
        timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `mer-pipeline ARGV...` to its end (argv items may be bytes: passed to the process as they are)."""
    command = [*(user or []), MER_PIPELINE, *(item if isinstance(item, bytes) else str(item) for item in argv)]
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout_s,
                          env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    """The single line the command wrote to stderr, which must start with `prefix`."""
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return synth_store(SynthSpec.from_preset("tiny", seed=3), tmp_path_factory.mktemp("errors") / "tiny").out


# ---- usage errors: exit 2, one line naming the flag and the value ---------------------------------------

BAD_FLAGS = [
    # (argv, what the line must say)
    (["generate", "--prompt", "x", "--ram-budget", "nonsense"], "argument --ram-budget: RAM budget 'nonsense' is not a size"),
    (["run", "--store", "S", "--compute-workers", "abc"], "argument --compute-workers: 'abc' is not an integer or 'auto'"),
    (["run", "--store", "S", "--cache-slots", "0"], "argument --cache-slots: cache_slots = 0 is out of range; allowed 1..1000000"),
    (["run", "--store", "S", "--tokens", "1.5"], "argument --tokens: '1.5' is not an integer"),
    (["run", "--store", "S", "--zipf-s", "nan"], "argument --zipf-s: 'nan' is not a finite number"),
    (["run", "--store", "S", "--io-backend", "floppy"], "argument --io-backend: io_backend = 'floppy' is not one of"),
    (["run", "--store", "S", "--predictors", "markov,psychic"], "argument --predictors: predictors = 'markov,psychic': unknown predictor 'psychic'"),
    (["up", "--handshake-timeout-s", "-1"], "argument --handshake-timeout-s: handshake_timeout_s = -1.0 is out of range"),
    (["generate", "--prompt", "x", "--top-p", "2"], "argument --top-p: '2' is not in (0, 1]"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "argument --temperature: '-1' is not a number >= 0"),
    (["generate", "--prompt", "x", "--seed", "-1"], "argument --seed: '-1' is not a seed in 0..2**64-1"),
    (["generate", "--prompt", "x", "-n", "many"], "argument -n/--max-tokens: 'many' is not an integer"),
    (["synth", "--preset", "tiny", "--out", "X", "--layers", "0"], "argument --layers: '0' is not a positive integer"),
    (["logs", "plot", "LOG", "--out", "D", "--window", "0"], "argument --window: '0' is not a positive integer"),
    (["logs", "timeline", "LOG", "--token", "-3"], "argument --token: '-3' is not an integer >= 0"),
    (["trace", "simulate", "T", "--cache-slots", "4", "--disk-mbps", "-5"], "argument --disk-mbps: '-5' is not a number > 0"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(argv[-2:]) for argv, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_a_usage_error_naming_flag_and_value(argv, message):
    result = mer(*argv)
    assert result.returncode == 2
    assert result.stdout == b""
    line = one_error_line(result, "mer-pipeline ")
    assert ": error: " in line and message in line, line


def test_the_same_bad_value_in_a_config_file_is_an_error_not_a_usage_error(tmp_path, tiny_store):
    config = tmp_path / "bad.toml"
    config.write_text("cache_slots = 0\n")
    result = mer("run", "--store", tiny_store, "--config", config)
    assert result.returncode == 1
    line = one_error_line(result, "mer-pipeline run: error: ")
    assert f"{config}: cache_slots = 0 is out of range" in line


def test_a_prompt_that_is_not_utf8_is_a_usage_error_naming_the_byte():
    """argv bytes that are not UTF-8 reach Python as lone surrogates; the tokenizer could not encode them."""
    result = mer("generate", "--prompt", b"caf\xe9 au lait", "-n", "1")
    assert result.returncode == 2
    line = one_error_line(result, "mer-pipeline generate: error: argument --prompt: ")
    assert "not valid UTF-8 (byte 0xe9 at character 3)" in line


# ---- a full disk: exit 1, the path named, nothing half-written left ---------------------------------------


@contextmanager
def small_tmpfs(size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted on a new directory (skip the test if mounting is refused)."""
    mount_point = Path(tempfile.mkdtemp(prefix="mer-enospc-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)
        mount_point.rmdir()


def fill_up(directory: Path) -> None:
    """Write a file into `directory` until its filesystem has no space left."""
    with open(directory / "filler", "wb", buffering=0) as filler:
        block = b"\0" * (1 << 16)
        try:
            while True:
                filler.write(block)
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC
        for size in (4096, 1):  # and the last pages
            try:
                while True:
                    filler.write(b"\0" * size)
            except OSError:
                pass


def run_until_the_disk_fills(argv: list[str], out: Path, timeout_s: float = CLI_TIMEOUT_S) -> tuple[int, str]:
    """Start `mer-pipeline ARGV`, stop it (SIGSTOP) as soon as its partial output directory appears (the
    free-space check up front has passed), fill the filesystem, let it go on: its next write finds the disk
    full. Returns (exit status, stderr)."""
    process = subprocess.Popen([MER_PIPELINE, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not list(out.parent.glob(f".{out.name}.partial-*")):
            assert process.poll() is None, f"ended before writing ({process.returncode}): {process.stderr.read()}"
            assert time.monotonic() < deadline, "no partial output directory appeared"
            time.sleep(0.002)
        process.send_signal(signal.SIGSTOP)
        fill_up(out.parent)
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stderr


def check_disk_full_error(status: int, stderr: str, command: str, out: Path) -> None:
    assert status == 1, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"mer-pipeline {command}: error: {out}: the disk is full: no space left while "
                             f"writing {out.parent}/.{out.name}.partial-"), stderr
    assert sorted(path.name for path in out.parent.iterdir()) == ["filler"]  # nothing half-written left


def test_synth_on_a_disk_that_fills_up(tmp_path):
    # 4 layers x 8 experts x 1.6 MiB of q8_0 = 51 MiB: passes the check (+64 MiB margin) on 120 MiB
    with small_tmpfs(120) as disk:
        out = disk / "store"
        status, stderr = run_until_the_disk_fills(
            ["synth", "--layers", 4, "--experts", 8, "--top-k", 2, "--d-model", 512, "--d-ff", 1024, "--dtype",
             "q8_0", "--out", out, "--quiet"], out)
        check_disk_full_error(status, stderr, "synth", out)


def test_convert_on_a_disk_that_fills_up(tmp_path):
    model = write_tiny_moe_gguf(tmp_path / "model.gguf", dtypes=("q8_0",) * 3, n_layers=4, n_experts=8,
                                d_model=512, d_ff=1024).path
    with small_tmpfs(120) as disk:
        out = disk / "store"
        status, stderr = run_until_the_disk_fills(["convert", model, "--out", out], out)
        check_disk_full_error(status, stderr, "convert", out)


def test_sigterm_during_synth_removes_the_partial_store_and_exits_143(tmp_path):
    out = tmp_path / "store"
    returncode, stdout, stderr = terminated_while(
        ["synth", "--layers", "4", "--experts", "8", "--top-k", "2", "--d-model", "512", "--d-ff", "1024", "--dtype",
         "q8_0", "--out", out, "--quiet"], lambda pid: bool(list(tmp_path.glob(".store.partial-*"))),
        "writing the store")
    assert returncode == 143, stderr
    assert stdout == "" and stderr == "mer-pipeline synth: terminated (SIGTERM)\n"
    assert list(tmp_path.iterdir()) == []  # neither the store nor its partial directory


def terminated_while(argv: list, is_working, what: str) -> tuple[int, str, str]:
    """Start `mer-pipeline ARGV`, SIGTERM it at a moment `is_working(pid)` is true of it, and return
    (exit status, stdout, stderr). It polls until it is working, stops the process (SIGSTOP), checks
    again (it cannot have finished meanwhile), then sends SIGTERM and SIGCONT."""
    process = subprocess.Popen([MER_PIPELINE, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ended before {what} ({process.returncode}): {process.communicate()[1]}"
            assert time.monotonic() < deadline, f"never caught {what}"
            if is_working(process.pid):
                process.send_signal(signal.SIGSTOP)
                if is_working(process.pid):
                    break
                process.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout, stderr


def test_sigterm_during_convert_removes_the_partial_store_and_exits_143(tmp_path):
    model = write_tiny_moe_gguf(tmp_path / "model.gguf", dtypes=("q8_0",) * 3, n_layers=4, n_experts=8,
                                d_model=512, d_ff=1024).path
    returncode, stdout, stderr = terminated_while(["convert", model, "--out", tmp_path / "store"],
                                                  lambda pid: bool(list(tmp_path.glob(".store.partial-*"))),
                                                  "writing the store")
    assert returncode == 143, stderr
    assert stdout == "" and stderr == "mer-pipeline convert: terminated (SIGTERM)\n"
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]  # neither the store nor its partial


def open_files_under(pid: int, directory: Path) -> list[Path]:
    """The files under `directory` that process `pid` has open."""
    found = []
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = Path(os.readlink(link))
        except OSError:  # closed meanwhile
            continue
        if target.is_relative_to(directory):
            found.append(target)
    return found


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """By path under `directory`: (mode, mtime in ns, content) of every file."""
    return {str(path.relative_to(directory)): (path.stat().st_mode, path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_sigterm_during_store_verify_exits_143_quietly_and_leaves_the_store_untouched(tmp_path):
    # 8 layers x 8 experts x 1.6 MiB of q8_0 = 107 MB read with O_DIRECT: tens of ms with a payload file open
    store = synth_store(SynthSpec(num_layers=8, experts_per_layer=8, top_k=2, d_model=512, d_ff=1024,
                                  dtypes=("q8_0",) * 3, seed=5), tmp_path / "store").out
    before = snapshot(tmp_path)
    returncode, stdout, stderr = terminated_while(
        ["store", "verify", store], lambda pid: any(path.suffix == ".bin" for path in open_files_under(pid, store)),
        "reading a payload file")
    assert returncode == 143, stderr
    assert stdout == "" and stderr == "mer-pipeline store: terminated (SIGTERM)\n"
    assert snapshot(tmp_path) == before
    assert mer("store", "verify", store, "--quiet").returncode == 0


# ---- permissions: the command run as `nobody` on a store it cannot read ------------------------------------


@pytest.fixture
def as_nobody(tmp_path) -> Iterator[tuple[list[str], Path]]:
    """(the prefix that runs a command as `nobody`, a directory `nobody` can reach but does not own)."""
    if os.geteuid() != 0:
        pytest.skip("running a command as another user needs root")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user 'nobody'")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup" if _has_group("nogroup") else "--regid=nobody",
              "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="mer-perm-", dir="/tmp"))
    base.chmod(0o755)
    writable = base / "nobody-home"  # numba's cache and HOME for the unprivileged process
    writable.mkdir(mode=0o777)
    writable.chmod(0o777)
    try:
        yield prefix, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def nobody_env(base: Path) -> dict:
    home = base / "nobody-home"
    return {"HOME": str(home), "NUMBA_CACHE_DIR": str(home / "numba"), "MER_CACHE_DIR": str(home / "cache")}


def readable_copy(store: Path, copy: Path) -> Path:
    """A copy of `store` at `copy` that every user may read (owned by root)."""
    shutil.copytree(store, copy)
    for path in [copy, *copy.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


UNREADABLE = {
    # case: (what is made unreadable, the file the error must name)
    "manifest": ("manifest.json", "manifest.json"),
    "payload file": ("experts-001.bin", "experts-001.bin"),
    "store directory": (".", "manifest.json"),
}


@pytest.mark.parametrize("case", UNREADABLE)
@pytest.mark.parametrize("command", [["store", "verify"], ["store", "info"], ["run", "--store"]],
                         ids=["store verify", "store info", "run"])
def test_an_unreadable_store_is_one_line_naming_the_file(case, command, as_nobody, tiny_store):
    prefix, base = as_nobody
    store = readable_copy(tiny_store, base / "store")
    target, named = UNREADABLE[case]
    (store / target).chmod(0o700 if target == "." else 0o600)  # owned by root: `nobody` cannot read it
    flags = ["--tokens", "3"] if command[0] == "run" else ["--json"]
    result = mer(*command, store, *flags, user=prefix, env=nobody_env(base))
    assert result.returncode == 1, result.stderr  # `run` refuses before starting the graph
    assert result.stdout == b""
    line = one_error_line(result, f"mer-pipeline {command[0]}: error: ")
    assert f"{store / named}: permission denied" in line, line


def test_a_log_file_that_cannot_be_created_is_one_line_naming_it(as_nobody, tiny_store):
    prefix, base = as_nobody  # base: owned by root, mode 755: `nobody` cannot create files in it
    store = readable_copy(tiny_store, base / "store")
    log = base / "run.jsonl"
    result = mer("run", "--store", store, "--tokens", 3, "--log-file", log, user=prefix, env=nobody_env(base))
    assert result.returncode == 1
    line = one_error_line(result, "mer-pipeline run: error: ")
    assert line.endswith(f"cannot open the log file (--log-file): {log}: permission denied"), line
    assert not log.exists()


# ---- a closed pipe: a quiet exit with status 141 -----------------------------------------------------------


@contextmanager
def pipe_without_reader() -> Iterator[int]:
    """The writing end of a pipe whose reading end is already closed: the first write fails (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


@pytest.mark.parametrize("argv", [["store", "info"], ["store", "info", "--json"], ["store", "verify", "--quiet"]],
                         ids=" ".join)
def test_output_into_a_closed_pipe_is_a_quiet_exit_141(argv, tiny_store):
    with pipe_without_reader() as stdout:
        result = mer(*argv, tiny_store, stdout=stdout)
    assert result.returncode == 141
    assert result.stderr == b""


# ---- a plot directory that cannot be created ---------------------------------------------------------------


def test_logs_plot_into_a_directory_that_cannot_be_created(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text("")  # never read: the output directory is checked first
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    result = mer("logs", "plot", log, "--out", blocker / "plots")
    assert result.returncode == 1
    line = one_error_line(result, "mer-pipeline logs: error: ")
    assert f"{blocker / 'plots'}: cannot create the plot directory: a component of the path is not a directory" in line
    assert blocker.read_text() == "in the way"


# ---- a manifest that contradicts its payloads -----------------------------------------------------------------


def contradicting_store(source: Path, directory: Path, field: str = "d_model") -> Path:
    """A copy of `source` whose manifest's geometry says `field` is twice what its payloads hold."""
    store = directory / f"store-{field}"
    shutil.copytree(source, store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["geometry"][field] *= 2
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return store


@pytest.mark.parametrize("command", [("verify", "--quiet"), ("info",), ("info", "--json")], ids=" ".join)
@pytest.mark.parametrize("field", ["d_model", "d_ff"])
def test_store_verify_and_info_name_the_geometry_field_that_contradicts_the_payloads(field, command, tmp_path,
                                                                                     tiny_store):
    store = contradicting_store(tiny_store, tmp_path, field)
    result = mer("store", command[0], store, *command[1:])
    assert result.stdout == b"", result.stdout
    assert result.returncode == 1
    line = one_error_line(result, "mer-pipeline store: error: ")
    value = 256 if field == "d_model" else 512
    assert (f"{store / 'manifest.json'}: geometry.{field} is {2 * value} but layers[0].format.{field} is "
            f"{value}") in line, line


@pytest.mark.slow  # would start the process graph, if the store were not refused first
def test_run_refuses_a_contradicting_manifest_before_starting_the_graph(leak_guard, tmp_path, tiny_store):
    store = contradicting_store(tiny_store, tmp_path)
    run = run_pipeline(leak_guard, store, "--tokens", 4, workdir=tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    assert "geometry.d_model is 512 but layers[0].format.d_model is 256" in run.stderr
    assert run.events_named("child_spawned") == []  # refused before any process started


@pytest.mark.slow  # would start the process graph, if the store were not refused first
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_run_refuses_a_store_whose_payload_file_is_truncated_or_missing_before_starting_the_graph(
        leak_guard, tmp_path, tiny_store, damage):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    payload = store / json.loads((store / "manifest.json").read_text())["layers"][1]["file"]
    if damage == "truncated":
        os.truncate(payload, 4096)
    else:
        payload.unlink()
    run = run_pipeline(leak_guard, store, "--tokens", 4, workdir=tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    reason = ("4096 bytes on disk, manifest says " if damage == "truncated"
              else "payload file listed in the manifest is missing")
    assert run.stderr.startswith(f"mer-pipeline run: error: {payload}: {reason}"), run.stderr
    assert run.events_named("child_spawned") == []  # refused before any process started


@pytest.mark.slow  # starts the process graph
def test_generate_rebuilds_a_cached_store_whose_manifest_contradicts_itself(leak_guard, tmp_path):
    """The store `generate` uses is a cache of the GGUF: one that fails its checks is converted again
    (said on stderr), and the tokens are those of the first run."""
    cache = tmp_path / "cache"

    def greedy() -> tuple[list[int], str]:
        log = tmp_path / f"generate-{uuid.uuid4().hex[:8]}.jsonl"
        argv = generate_argv(tiny_model_path(), "--prompt", "Once upon", "-n", 4, "--ignore-eos",
                             "--compute-workers", 1, log_path=log)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_S,
                                env={**os.environ, "MER_CACHE_DIR": str(cache)})
        for run_id in run_ids_in_log(log):
            leak_guard.add_run(run_id)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["tokens"], result.stderr

    first, _ = greedy()
    (store,) = (cache / "stores").iterdir()
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["geometry"]["d_model"] += 32
    (store / "manifest.json").write_text(json.dumps(manifest))
    again, stderr = greedy()
    assert again == first
    assert f"mer-pipeline generate: converting {tiny_model_path()} to {store}" in stderr
    assert json.loads((store / "manifest.json").read_text())["geometry"]["d_model"] == manifest["geometry"]["d_model"] - 32


# ---- signals and closed pipes while the graph runs -----------------------------------------------------------


class RunningCommand:
    """A `mer-pipeline` command (with --log-file) started in the background, under the leak guard."""

    def __init__(self, guard, argv: list, log_path: Path, *, stdout=subprocess.PIPE, env: dict | None = None):
        self.guard, self.log_path = guard, log_path
        self.process = subprocess.Popen([str(item) for item in argv], stdout=stdout, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, **(env or {})})
        guard.add_supervisor_pid(self.process.pid)

    def wait_for_event(self, name: str, count: int = 1, timeout_s: float = CLI_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len([e for e in read_json_lines(self.log_path) if e.get("event") == name]) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"ended ({self.process.returncode}) before {count} {name}: "
                                     f"{self.process.stderr.read()}")
            assert time.monotonic() < deadline, f"no {count} {name} events within {timeout_s:g} s"
            time.sleep(0.02)

    def finish(self, timeout_s: float = CLI_TIMEOUT_S) -> tuple[int, str, str]:
        try:
            stdout, stderr = self.process.communicate(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.communicate()
            for run_id in run_ids_in_log(self.log_path):
                self.guard.add_run(run_id)
        return self.process.returncode, stdout or "", stderr

    def events_named(self, name: str) -> list[dict]:
        return [event for event in read_json_lines(self.log_path) if event.get("event") == name]


def check_graph_shut_down_cleanly(command: RunningCommand) -> None:
    """Every spawned child stopped on request (none terminated or killed), none left running."""
    spawned = {event["child"] for event in command.events_named("child_spawned")}
    assert spawned, "no child was spawned"
    assert {event["process"] for event in command.events_named("child_stopped")} == spawned
    assert command.events_named("child_terminated") == command.events_named("child_killed") == []


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """A cache directory holding the tiny model's converted store (so generate prints no conversion note)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MER_CACHE_DIR", str(cache))
        converted_store(tiny_model_path(), command="test")
    return cache


def generate_command(guard, tmp_path: Path, cache: Path, *flags, stdout=subprocess.PIPE) -> RunningCommand:
    log = tmp_path / f"generate-{uuid.uuid4().hex[:8]}.jsonl"
    tokens = 240  # the tiny model's context is 256
    argv = generate_argv(tiny_model_path(), "--prompt", "Once upon a time", "-n", tokens, "--ignore-eos",
                         "--compute-workers", 1, *flags, log_path=log, as_json=False)
    return RunningCommand(guard, argv, log, stdout=stdout, env={"MER_CACHE_DIR": str(cache)})


@pytest.mark.slow  # starts the process graph
@pytest.mark.parametrize("signal_number, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_generate_shuts_the_graph_down_and_exits_128_plus_its_number(signal_number, status, leak_guard,
                                                                                 tmp_path, model_cache):
    command = generate_command(leak_guard, tmp_path, model_cache)
    command.wait_for_event("generation_token", count=3)
    command.process.send_signal(signal_number)
    returncode, _, stderr = command.finish()
    assert returncode == status, stderr
    assert stderr.splitlines()[-1] == f"mer-pipeline generate: {signal_number.name}: graph shut down", stderr
    assert "Traceback" not in stderr
    check_graph_shut_down_cleanly(command)


@pytest.mark.slow  # starts the process graph
def test_sigterm_to_up_shuts_the_graph_down_and_exits_143(leak_guard, tmp_path, tiny_store):
    log = tmp_path / "up.jsonl"
    argv = [MER_PIPELINE, "up", "--store", tiny_store, "--tokens", LONG_RUN_TOKENS, "--cache-slots", 4,
            "--compute-workers", 1, "--log-file", log, "--handshake-timeout-s", HANDSHAKE_TIMEOUT_S]
    command = RunningCommand(leak_guard, argv, log)
    command.wait_for_event("token_done", count=3)
    command.process.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = command.finish()
    assert returncode == 143, stderr
    assert stdout == ""
    assert stderr.splitlines()[-1] == "mer-pipeline up: SIGTERM: graph shut down", stderr
    check_graph_shut_down_cleanly(command)


@pytest.mark.slow  # starts the process graph
def test_generate_into_a_closed_pipe_stops_quietly_with_141(leak_guard, tmp_path, model_cache):
    """`generate ... | head -c 5`: the reader goes away while tokens stream; the graph is shut down
    (the leak guard: no process, /dev/shm segment or runtime directory left) and the exit is quiet."""
    read_end, write_end = os.pipe()
    try:
        command = generate_command(leak_guard, tmp_path, model_cache, stdout=write_end)
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        command.wait_for_event("generation_token", count=2)
        assert reader.read(1)  # the text streams, like `head -c 1`
    returncode, _, stderr = command.finish()
    assert returncode == 141, stderr
    # quiet: nothing but the RAM plan printed at start-up (before any token), no error, no traceback
    assert [line for line in stderr.splitlines() if not line.startswith("mer-pipeline generate: RAM budget")] == []
    check_graph_shut_down_cleanly(command)


@pytest.fixture(scope="module")
def run_log(tiny_store, tmp_path_factory) -> Path:
    """The log of a real short run (which left nothing behind: `module_runs` checks)."""
    flags = ("--tokens", 6, "--cache-slots", 4, "--compute-workers", 1)
    return module_runs(tiny_store, {"run": flags}, tmp_path_factory)["run"].log_path


@pytest.mark.slow  # starts the process graph (for a real log)
@pytest.mark.parametrize("argv", [["summarize"], ["summarize", "--json"], ["timeline", "--token", "2"]], ids=" ".join)
def test_logs_into_a_closed_pipe_is_a_quiet_exit_141(argv, run_log):
    with pipe_without_reader() as stdout:
        result = mer("logs", argv[0], run_log, *argv[1:], stdout=stdout)
    assert result.returncode == 141
    assert result.stderr == b""
