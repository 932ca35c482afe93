"""The embedded default of `mer-pipeline up`: a small synthetic store made once in the cache dir,
and the converted store of a GGUF, cached by its fingerprint, for `up --model` and `generate`."""

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


def converted_store(model: Path, *, command: str = "up", start_phase=None, parts=None) -> Path:
    """The expert store of a GGUF model, converted on first use and found again by the GGUF's
    fingerprint without reading the whole model (`mer.store.store_cache`). `command` names the
    caller in the messages on stderr; `start_phase` (a `ProgressDisplay`'s) shows the conversion's
    progress; `parts` the model already opened (`mer.store.gguf_files.open_parts`)."""
    from mer.store.convert import convert_gguf
    from mer.store.store_cache import cached_store

    def convert(model: Path, directory: Path, force: bool) -> None:
        convert_gguf(model, directory, force=force, start_phase=start_phase)

    def announce(line: str) -> None:
        print(f"mer-pipeline {command}: {line}", file=sys.stderr)

    return cached_store(model, read_environment().cache_dir, convert=convert, announce=announce, parts=parts)
