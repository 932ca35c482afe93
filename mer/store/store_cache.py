"""The cache of converted stores under `$MER_CACHE_DIR/stores`: the store of a GGUF found at start-up
without reading the model, converted on first use.

`cached_store(model)` opens the model's header (the parts, `mer.store.gguf_files`), computes its
fingerprint (`mer.store.gguf_fingerprint`: ~4 MiB read per part) and stats its files, then:

1. The store recording that fingerprint: `stores/STEM-FINGERPRINT16` (the name this version gives
   a conversion), else any store in the cache whose manifest records it (an older store upgraded in
   step 2 keeps its name).
   - Its recorded file stats (size, mtime_ns, inode per part) equal today's: reused. Nothing else
     of the model is read.
   - They differ (the file was rewritten, touched or copied): the full identity
     (`mer.store.gguf_identity`, a read of the whole model) is computed once, saying so on stderr.
     Equal to the manifest's `source.hash`: today's stats (and paths) are recorded (an atomic
     manifest update) and the store is reused; different: it is converted anew.
2. A store converted by an older mer (no fingerprint in its manifest) for a model of the same total
   size, named after the same file (`STEM-...`) or recording the same paths: verified once with the
   full identity, saying so on stderr; equal: the fingerprint and stats are recorded in its
   manifest, so that step 1 finds it from then on; different: left alone.
3. Otherwise the model is converted into `stores/STEM-FINGERPRINT16` (replacing a stale store
   there); the conversion records the full identity, the fingerprint and the stats.

A store is never reused for a model whose header, size or a sampled block differs from the one it
was converted from (the fingerprint covers them). Each lookup logs `converted_store_found`.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from mer.errors import StoreError
from mer.logging_setup import get_logger
from mer.store import gguf_identity
from mer.store.gguf_files import GGUFPart, open_parts
from mer.store.gguf_fingerprint import gguf_fingerprint, source_file_stats
from mer.store.manifest import MANIFEST_NAME, Manifest, SourceFileStat

STORES_DIRECTORY = "stores"
NAME_DIGITS = 16  # hex digits of the fingerprint in a store's directory name


def store_directory_name(model: Path, fingerprint: str) -> str:
    """The directory (under the cache's `stores/`) that a conversion of `model` gets."""
    return f"{model.stem}-{fingerprint[:NAME_DIGITS]}"


def cached_store(model: str | Path, cache_dir: Path, *, convert: Callable[[Path, Path, bool], None],
                 announce: Callable[[str], None], parts: Sequence[GGUFPart] | None = None) -> Path:
    """The store directory of the GGUF `model` in `cache_dir/stores` (see the module docstring).

    `convert(model, directory, force)` converts when no store fits; `announce(line)` tells the user
    why this start is slow (a full identity check or a conversion). `parts`: the model already
    opened (`open_parts(model)`), so that its header is not parsed twice."""
    started = time.perf_counter()
    model = Path(model)
    stores = cache_dir / STORES_DIRECTORY
    parts = open_parts(model) if parts is None else parts
    fingerprint = gguf_fingerprint(parts)
    stats = source_file_stats([part.path for part in parts])
    lookup = _Lookup(model, parts, fingerprint, stats, announce)
    named = stores / store_directory_name(model, fingerprint)
    found = lookup.by_fingerprint(named, stores) or lookup.older_store(stores)
    if found is None:
        announce(f"converting {model} to {named}")
        convert(model, named, named.exists() or named.is_symlink())
        found, check = named, "converted"
    else:
        found, check = found
    get_logger().info("converted_store_found", store=str(found), check=check, fingerprint=fingerprint,
                      seconds=round(time.perf_counter() - started, 3))
    return found


class _Lookup:
    """Steps 1 and 2 of the module docstring for one model."""

    def __init__(self, model: Path, parts: Sequence[GGUFPart], fingerprint: str, stats: tuple[SourceFileStat, ...],
                 announce: Callable[[str], None]):
        self.model, self.parts, self.fingerprint, self.stats = model, parts, fingerprint, stats
        self.announce = announce
        self.nbytes = sum(stat.nbytes for stat in stats)
        self.paths = tuple(str(part.path.resolve()) for part in parts)
        self._identity: str | None = None

    def identity(self, why: str) -> str:
        """The model's full identity, computed at most once per lookup, announced with `why`."""
        if self._identity is None:
            self.announce(f"{why}: checking the full identity of {self.model} once (reads all "
                          f"{self.nbytes / 1e9:.1f} GB; later starts read a few MiB)")
            self._identity = gguf_identity.gguf_identity([part.path for part in self.parts])
        return self._identity

    def by_fingerprint(self, named: Path, stores: Path) -> tuple[Path, str] | None:
        others = (directory for directory, source in _recorded_sources(stores)
                  if directory != named and source.get("fingerprint") == self.fingerprint)
        candidates = itertools.chain([named], others)  # the others are read only when `named` does not fit
        for directory in candidates:
            manifest = _usable_manifest(directory)
            if manifest is None or manifest.source.fingerprint != self.fingerprint:
                continue
            if manifest.source.stats == self.stats:
                return directory, "fingerprint"
            why = f"{self.model} was modified, touched or copied since {directory} was converted"
            if self.identity(why) == manifest.source.hash:
                self._record(directory, manifest)
                return directory, "full_identity"
        return None

    def older_store(self, stores: Path) -> tuple[Path, str] | None:
        for directory, source in _recorded_sources(stores):
            if source.get("fingerprint") or source.get("kind") != "gguf" or source.get("nbytes") != self.nbytes:
                continue
            if not (directory.name.startswith(f"{self.model.stem}-") or tuple(source.get("paths", ())) == self.paths):
                continue
            manifest = _usable_manifest(directory)
            if manifest is None:
                continue
            why = f"{directory} was converted by an older mer, without a fingerprint"
            if self.identity(why) == manifest.source.hash:
                self._record(directory, manifest)
                return directory, "full_identity"
        return None

    def _record(self, directory: Path, manifest: Manifest) -> None:
        """Record today's fingerprint, stats and paths in the verified store's manifest (atomically)."""
        source = replace(manifest.source, paths=self.paths, fingerprint=self.fingerprint, stats=self.stats)
        try:
            replace(manifest, source=source).save(directory)
        except OSError as error:
            print(f"mer-pipeline: warning: cannot update {directory / MANIFEST_NAME} ({error}); the next start "
                  f"checks the full identity again", file=sys.stderr)


def _usable_manifest(directory: Path) -> Manifest | None:
    """The manifest of a whole store at `directory`; None for anything else (a shard store holds only
    some experts: never a model's cached store)."""
    try:
        manifest = Manifest.load(directory)
    except StoreError:
        return None
    return manifest if manifest.shard is None else None


def _recorded_sources(stores: Path) -> Iterator[tuple[Path, dict]]:
    """(directory, the manifest's `source` object) of every store in `stores`, read without validation."""
    if not stores.is_dir():
        return
    for directory in sorted(stores.iterdir()):
        if directory.name.startswith("."):  # partial conversions
            continue
        try:
            source = json.loads((directory / MANIFEST_NAME).read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(source, dict):
            yield directory, source
