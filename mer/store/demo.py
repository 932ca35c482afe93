"""The embedded default of `mer-pipeline up`: a small synthetic store made once in the cache dir,
and a converted store cached per GGUF identity for `up --model`."""

from __future__ import annotations

import sys
from pathlib import Path

from mer.environment import read_environment
from mer.errors import StoreError
from mer.store.manifest import Manifest
from mer.store.synth import SynthSpec, synth_store

DEMO_PRESET = "tiny"
DEMO_SEED = 0
DEMO_STORE_NAME = f"demo-{DEMO_PRESET}-seed{DEMO_SEED}"


def _is_usable(directory: Path) -> bool:
    try:
        Manifest.load(directory)
    except StoreError:
        return False
    return True


def demo_store() -> Path:
    """The demo store, written on first use under `$MER_CACHE_DIR` (default ~/.cache/mer)."""
    directory = read_environment().cache_dir / "stores" / DEMO_STORE_NAME
    if _is_usable(directory):
        return directory
    print(f"mer-pipeline up: writing the demo store ({DEMO_PRESET} preset) to {directory}", file=sys.stderr)
    synth_store(SynthSpec.from_preset(DEMO_PRESET, seed=DEMO_SEED), directory, force=directory.exists())
    return directory


def converted_store(model: Path, *, command: str = "up", start_phase=None) -> Path:
    """The expert store of a GGUF model, converted on first use and cached by the GGUF's identity.
    `command` names the caller in the message on stderr; `start_phase` (a `ProgressDisplay`'s)
    shows the conversion's progress."""
    from mer.store.convert import convert_gguf
    from mer.store.gguf_identity import gguf_identity
    from mer.store.gguf_files import split_part_paths

    identity = gguf_identity(list(split_part_paths(model)))
    directory = read_environment().cache_dir / "stores" / f"{Path(model).stem}-{identity[:16]}"
    if _is_usable(directory) and Manifest.load(directory).source.hash == identity:
        return directory
    print(f"mer-pipeline {command}: converting {model} to {directory}", file=sys.stderr)
    convert_gguf(model, directory, force=directory.exists(), start_phase=start_phase)
    return directory
