"""`convert` killed with SIGKILL leaves its hidden `.NAME.partial-PID-START` directory; the next writer
into the same directory reclaims it (and only directories of dead writers), saying what and how much.

Real processes: `mer-pipeline convert` killed with os.kill while it writes, then run again; reused
pids are the test's own live process with another start time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mer.runtime.liveness import process_start_time
from mer.store.partials import partial_dir, reclaim_dead_partials
from mer.store.reader import ExpertStore
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import dead_process

MER_PIPELINE = Path(sys.executable).parent / "mer-pipeline"


def partials_of(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if ".partial-" in path.name)


def fill(directory: Path, nbytes: int) -> Path:
    directory.mkdir()
    (directory / "experts-000.bin").write_bytes(os.urandom(nbytes))
    return directory


def test_partial_dir_names_the_writer_and_its_start_time(tmp_path):
    path = partial_dir(tmp_path / "store")
    assert path == tmp_path / f".store.partial-{os.getpid()}-{process_start_time(os.getpid())}"


def test_only_directories_of_dead_writers_are_reclaimed(tmp_path, capsys):
    dead_pid, dead_start = dead_process()
    me, my_start = os.getpid(), process_start_time(os.getpid())
    dead = fill(tmp_path / f".a.partial-{dead_pid}-{dead_start}", 3 * 4096)
    reused = fill(tmp_path / f".b.partial-{me}-{my_start + 1}", 4096)  # my pid, another start: a reused pid
    legacy_dead = fill(tmp_path / f".c.partial-{dead_pid}", 4096)
    live = fill(tmp_path / f".d.partial-{me}-{my_start}", 4096)
    legacy_live = fill(tmp_path / f".e.partial-{me}", 4096)  # cannot tell a reuse: kept
    not_ours = fill(tmp_path / "f.partial-1", 4096)  # not hidden: not a writer's directory
    (tmp_path / f".g.partial-{dead_pid}-{dead_start}").write_text("a file, not a directory")

    reclaimed = dict(reclaim_dead_partials(tmp_path))

    assert set(reclaimed) == {dead, reused, legacy_dead}
    assert reclaimed[dead] == 3 * 4096 and reclaimed[reused] == 4096 == reclaimed[legacy_dead]
    assert not dead.exists() and not reused.exists() and not legacy_dead.exists()
    assert live.exists() and legacy_live.exists() and not_ours.exists()
    assert (tmp_path / f".g.partial-{dead_pid}-{dead_start}").exists()


def _partial_with_data(process: subprocess.Popen, parent: Path, known: set[Path] = frozenset()) -> Path:
    """The partial directory (not in `known`) of the writer `process` as soon as it holds data."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        for partial in partials_of(parent):
            if partial not in known and any(file.stat().st_blocks for file in partial.iterdir()):
                return partial
        time.sleep(0.005)
    pytest.fail(f"the writer ended ({process.returncode}) before it was caught mid-write")


def _kill_while_writing(argv: list[str], out: Path) -> Path:
    """Start `argv`, SIGKILL it as soon as its partial directory holds data; the directory left."""
    known = set(partials_of(out.parent))
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        partial = _partial_with_data(process, out.parent, known)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        return partial
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def reclaimed_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if "partial_store_reclaimed" in line]


def test_a_convert_killed_with_sigkill_is_reclaimed_by_the_next_convert(tmp_path):
    # large enough (~100 MiB of f32 experts) that the write takes a while on this disk
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", dtypes=("f32",) * 3, n_layers=2, n_experts=8, d_model=512,
                               d_ff=1536)
    out = tmp_path / "stores" / "m"
    out.parent.mkdir()
    argv = [str(MER_PIPELINE), "convert", str(info.path), "--out", str(out), "--quiet"]
    left = _kill_while_writing(argv, out)
    assert left.name.startswith(".m.partial-") and not out.exists()
    left_bytes = sum(file.stat().st_blocks * 512 for file in left.iterdir())

    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert partials_of(out.parent) == []
    assert ExpertStore.open(out).manifest.geometry.num_experts == 16
    (event,) = reclaimed_events(done.stderr)
    assert event["path"] == str(left) and event["bytes"] == left_bytes > 0
    assert event["message"].startswith(f"removed {left} (")


def test_the_cached_conversion_of_generate_reclaims_dead_partials(tmp_path, monkeypatch):
    from mer.store.demo import converted_store

    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "cache"))
    info = write_tiny_moe_gguf(tmp_path / "m.gguf")
    dead_pid, dead_start = dead_process()
    stores = tmp_path / "cache" / "stores"
    stores.mkdir(parents=True)
    left = fill(stores / f".m-0123456789abcdef.partial-{dead_pid}-{dead_start}", 8192)

    directory = converted_store(info.path, command="generate")

    assert not left.exists() and partials_of(stores) == []
    assert ExpertStore.open(directory).manifest.geometry.num_experts == 8


@pytest.mark.slow
def test_synth_reclaims_a_killed_writer_s_partial_but_not_a_live_writer_s(tmp_path):
    """Writer B is stopped (SIGSTOP) mid-write: alive. Writer A is killed mid-write: dead. The next
    synth into the same directory removes A's partial, logs it, and leaves B's, which then finishes."""
    parent = tmp_path / "stores"
    parent.mkdir()
    # ~100 MiB of f32 experts: long enough to be caught mid-write
    big = ["--layers", "2", "--experts", "8", "--top-k", "2", "--d-model", "512", "--d-ff", "1024", "--dtype", "f32"]

    def synth(name: str, *flags: str) -> list[str]:
        return [str(MER_PIPELINE), "synth", *flags, "--out", str(parent / name), "--quiet"]

    live = subprocess.Popen(synth("b", *big), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        live_partial = _partial_with_data(live, parent)
        os.kill(live.pid, signal.SIGSTOP)
        dead_partial = _kill_while_writing(synth("a", *big), parent / "a")
        assert live_partial.exists() and dead_partial.exists()  # A's own reclaim left the live writer's alone
        dead_bytes = sum(file.stat().st_blocks * 512 for file in dead_partial.iterdir())

        done = subprocess.run([*synth("c", "--preset", "tiny"), "--json"], capture_output=True, text=True, timeout=120)

        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["out"] == str(parent / "c")  # stdout is the result alone
        (event,) = reclaimed_events(done.stderr)
        assert event["path"] == str(dead_partial) and event["bytes"] == dead_bytes > 0
        assert not dead_partial.exists()
        assert partials_of(parent) == [live_partial]  # the stopped writer's directory is untouched
    finally:
        os.kill(live.pid, signal.SIGCONT)
    _, stderr = live.communicate(timeout=120)
    assert live.returncode == 0, stderr
    assert partials_of(parent) == []
    assert sorted(path.name for path in parent.iterdir()) == ["b", "c"]
    assert ExpertStore.open(parent / "b").manifest.geometry.num_experts == 16
