"""The preparation of `tools/bench_beyond_ram.py`, before its first run: the engines, the model (a
Mixtral-shaped GGUF written once, with a `.json` sidecar, and refused when the disk lacks room), its
converted store where `generate --model` finds it, the memory cgroup probe and `--quick`'s memory
allowance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from memory_cgroup import CgroupUnavailable, cgroup_name, make_memory_cgroup  # tools/ (tools run as scripts)
from moe_gguf_writer import GEOMETRIES, MoEGeometry, describe, gguf_nbytes_estimate, plain_token_ids, write_moe_gguf

GIB = 2**30
LLAMA = "llama.cpp"
ROOM_MARGIN = 2 * GIB


class BenchError(SystemExit):
    """A one-line refusal: exit status 2 with the message on stderr."""

    def __init__(self, message: str):
        super().__init__(f"bench_beyond_ram: {message}")


@dataclass
class Engine:
    label: str
    mer_args: list[str] = field(default_factory=list)  # None-like for llama.cpp: is_llama

    @property
    def is_llama(self) -> bool:
        return self.label == LLAMA


@dataclass
class Setup:
    """Where the model is and how the runs are made fair (filled in by `prepare`)."""

    gguf: Path
    store: Path
    workdir: Path
    geometry: MoEGeometry
    prompt: list[int]
    cgroups: bool
    skipped: list[str] = field(default_factory=list)
    quick_allowance: dict | None = None  # quick mode: mer budget and llama.cpp's data allowance


def mer_pipeline() -> str:
    beside = Path(sys.executable).parent / "mer-pipeline"
    found = str(beside) if beside.exists() else shutil.which("mer-pipeline")
    if not found:
        raise BenchError("mer-pipeline is not installed beside this Python nor on PATH")
    return found


def child_environment(workdir: Path) -> dict[str, str]:
    return {**os.environ, "MER_CACHE_DIR": str(workdir / "mer-cache"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


# --- the model and its store ----------------------------------------------------------------------------

def check_room(gguf: Path, store: Path, geometry: MoEGeometry, write_gguf: bool, convert: bool) -> None:
    """Refuse when the file systems lack room for what still has to be written."""
    needs: dict[int, tuple[Path, int]] = {}
    for path, nbytes, wanted in ((gguf.parent, gguf_nbytes_estimate(geometry), write_gguf),
                                 (store.parent, geometry.expert_bytes_total + (64 << 20), convert)):
        if not wanted:
            continue
        path.mkdir(parents=True, exist_ok=True)
        device = path.stat().st_dev
        previous = needs.get(device, (path, 0))[1]
        needs[device] = (path, previous + nbytes)
    for path, nbytes in needs.values():
        free = shutil.disk_usage(path).free
        if free < nbytes + ROOM_MARGIN:
            raise BenchError(f"{path} has {free / 1e9:.1f} GB free; the GGUF and its converted store need "
                             f"{nbytes / 1e9:.1f} GB (+{ROOM_MARGIN / 1e9:.0f} GB margin): free space or pass "
                             f"--gguf/--store on a larger disk")


def sidecar_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".json")


def gguf_is_current(gguf: Path, geometry: MoEGeometry, seed: int) -> bool:
    try:
        recorded = json.loads(sidecar_path(gguf).read_text())
        stat = gguf.stat()
    except (OSError, ValueError):
        return False
    return (recorded.get("geometry") == describe(geometry) and recorded.get("seed") == seed
            and recorded.get("size") == stat.st_size and recorded.get("mtime_ns") == stat.st_mtime_ns)


def write_model(gguf: Path, geometry: MoEGeometry, seed: int, quiet: bool) -> float:
    started = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if not quiet and time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            print(f"  writing {gguf.name}: {done / 1e9:.1f} / {total / 1e9:.1f} GB", file=sys.stderr)

    sidecar_path(gguf).unlink(missing_ok=True)
    write_moe_gguf(gguf, geometry, seed=seed, progress=progress)
    stat = gguf.stat()
    sidecar_path(gguf).write_text(json.dumps({"geometry": describe(geometry), "seed": seed, "size": stat.st_size,
                                              "mtime_ns": stat.st_mtime_ns}, indent=1))
    return time.monotonic() - started


def convert_model(gguf: Path, store: Path, workdir: Path) -> dict:
    command = [mer_pipeline(), "convert", str(gguf), "--out", str(store), "--force", "--json", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=child_environment(workdir))
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)


def store_hash(store: Path) -> str | None:
    from mer.store.manifest import Manifest

    try:
        return Manifest.load(store).source.hash
    except Exception:  # a missing or unreadable store is converted again
        return None


def link_store_for_generate(gguf: Path, store: Path, workdir: Path, source_hash: str) -> None:
    """Put the store in `$MER_CACHE_DIR/stores`, where `generate --model` finds it by the fingerprint its
    manifest records (`mer.store.store_cache`)."""
    stores = workdir / "mer-cache" / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    link = stores / f"{gguf.stem}-{source_hash[:16]}"
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == store.resolve():
            return
        if link.is_symlink():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(store.resolve(), target_is_directory=True)


def model_files(setup: Setup) -> list[Path]:
    return [setup.gguf, *(path for path in setup.store.rglob("*") if path.is_file())]


# --- setup ---------------------------------------------------------------------------------------------

def quick_allowance(setup: Setup, args: argparse.Namespace, engines: list[Engine]) -> dict:
    """--quick: mer's budget = its fixed part + a share of the experts; llama.cpp gets the same data memory."""
    os.environ["MER_CACHE_DIR"] = str(setup.workdir / "mer-cache")
    from mer.cli.generation_setup import PromptSpec, prepare_generation
    from mer.cli.main import build_parser
    from mer.config import config_overrides
    from mer.logging_setup import configure_logging

    configure_logging("bench_beyond_ram")  # mer's events (converted_store_found) to stderr: stdout is the --json result

    defaults = next(engine for engine in engines if not engine.is_llama)
    parsed = build_parser().parse_args(["generate", "--model", str(setup.gguf), "--prompt-tokens",
                                        ",".join(map(str, setup.prompt)), "-n", str(args.max_tokens),
                                        "--ram-budget", "1TiB", *defaults.mer_args])
    plan = prepare_generation(setup.gguf, PromptSpec(None, parsed.prompt_tokens, False), max_tokens=args.max_tokens,
                              config_path=parsed.config, overrides=config_overrides(parsed),
                              ram_budget=parsed.ram_budget).ram_plan
    total_experts = setup.geometry.n_layers * setup.geometry.n_experts
    slots = max(setup.geometry.top_k, round(args.quick_cache_fraction * total_experts))
    arena = (slots + plan.reserve_slots) * plan.slot_nbytes
    return {"mer_budget": plan.fixed_nbytes + arena, "mer_fixed_bytes": plan.fixed_nbytes,
            "llama_data_allowance": plan.dense_nbytes + arena, "cache_slots": slots,
            "reserve_slots": plan.reserve_slots, "slot_bytes": plan.slot_nbytes,
            "expert_bytes_total": setup.geometry.expert_bytes_total}


def mixtral_geometry(layers: int | None) -> MoEGeometry:
    """Mixtral-8x7B's shape, or the same with `layers` blocks (named mixtral-8x7b-<N>l)."""
    full = GEOMETRIES["mixtral-8x7b"]
    if layers is None or layers == full.n_layers:
        return full
    if not 1 <= layers <= 64:
        raise BenchError(f"--layers {layers}: give 1 to 64 blocks")
    return replace(full, name=f"{full.name}-{layers}l", n_layers=layers)


def prepare(args: argparse.Namespace, engines: list[Engine]) -> tuple[Setup, dict]:
    timings: dict = {}
    if args.quick:
        geometry = GEOMETRIES["quick"]
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mer-bench-beyond-ram-"))
        gguf, store = workdir / "quick-q4_0.gguf", workdir / "quick-q4_0-gguf"
    else:
        geometry = mixtral_geometry(args.layers)
        gguf = args.gguf or Path(f"/work/stores/{geometry.name}-q4_0.gguf")
        store = args.store or gguf.with_name(gguf.stem + "-gguf")
        workdir = args.workdir or store.parent / "bench-beyond-ram"
    workdir.mkdir(parents=True, exist_ok=True)
    write = args.rewrite or not gguf_is_current(gguf, geometry, args.seed)
    recorded = None if write else json.loads(sidecar_path(gguf).read_text()).get("source_hash")
    convert = write or recorded is None or store_hash(store) != recorded
    check_room(gguf, store, geometry, write, convert)
    if write:
        timings["write_s"] = write_model(gguf, geometry, args.seed, quiet=args.quick)
    if convert:
        started = time.monotonic()
        converted = convert_model(gguf, store, workdir)
        timings["convert_s"] = time.monotonic() - started
        recorded = converted["source_hash"]
        sidecar = json.loads(sidecar_path(gguf).read_text())
        sidecar_path(gguf).write_text(json.dumps({**sidecar, "source_hash": recorded, "store": str(store)}, indent=1))
    link_store_for_generate(gguf, store, workdir, recorded)
    setup = Setup(gguf, store, workdir, geometry, plain_token_ids(geometry, args.prompt_tokens, args.seed), False)
    if args.no_cgroup:
        setup.skipped.append("memory cgroups (--no-cgroup)")
    else:
        try:
            make_memory_cgroup(cgroup_name("probe")).remove()
            setup.cgroups = True
        except CgroupUnavailable as error:
            if not args.quick:
                raise BenchError(f"{error}; the figures need both engines in a memory cgroup (--no-cgroup runs "
                                 f"without, not comparable)") from None
            setup.skipped.append(f"memory cgroups ({error})")
    if args.quick:
        setup.skipped.append("dropping the whole page cache (only the model's files are evicted)")
        setup.quick_allowance = quick_allowance(setup, args, engines)
        if not setup.cgroups:
            setup.skipped.append("a fair bytes comparison: without a cgroup llama.cpp keeps the model in the page cache")
    elif os.geteuid() != 0:
        setup.skipped.append("dropping the page cache (not root: only the model's files are evicted)")
    if shutil.which("fio") is None:
        setup.skipped.append("fio (not installed): no O_DIRECT bandwidth reference")
    return setup, timings
