"""Write an expert store atomically: into a temporary directory, renamed into place when whole.

Usage:

    with StoreWriter(out, geometry, layer_formats, source, layout="native", force=False) as writer:
        for expert_id in range(geometry.num_experts):
            writer.write_expert(expert_id, payload_bytes)
    # on normal exit: every expert written, checksums re-verified, manifest saved, directory renamed

An exception inside the block (or a missing expert) removes the temporary directory, so an
interrupted conversion never leaves a store that looks whole. Free space is checked up front; if
the disk still fills up while writing (another writer took the space), the error is a DiskSpaceError
naming the store and the file, and the temporary directory is removed. A writer killed outright
leaves its temporary directory; the next writer into the same directory reclaims it
(`mer.store.partials`).
Payload files are written with O_DIRECT where the filesystem allows it (see
`mer.store.direct_io`: buffered writes drain far slower than the disk on this machine); a payload
that is not page-aligned in memory goes through one aligned staging buffer.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mer import __version__
from mer.errors import ConfigError, DiskSpaceError, StoreError, StoreExistsError, describe_os_error
from mer.compute.expert_format import LAYOUTS, ExpertFormat, round_up
from mer.store.direct_io import is_page_aligned, open_direct, page_aligned_empty, pwrite_all
from mer.store.manifest import (MANIFEST_NAME, ExpertEntry, FileEntry, Geometry, LayerEntry, Manifest, ShardInfo,
                                SourceInfo)
from mer.store.partials import partial_dir, reclaim_dead_partials
from mer.store.checksum import payload_checksum

SPACE_MARGIN_BYTES = 64 * 1024 * 1024
# start_phase(description, total_bytes) returns advance(nbytes); see mer.cli.progress.
PhaseStarter = Callable[[str, int], Callable[[int], None]]
MatrixTransform = Callable[[str, np.ndarray, int, int], np.ndarray]  # (dtype, bytes, rows, columns) -> bytes


def lazy_phase(start_phase: PhaseStarter | None, description: str, total: int) -> Callable[[int], None]:
    """A progress callback that starts its phase on first use, when the phase really begins."""
    advance: Callable[[int], None] | None = None

    def progress(nbytes: int) -> None:
        nonlocal advance
        if start_phase is not None:
            advance = advance or start_phase(description, total)
            advance(nbytes)

    return progress


def matrix_transform(layout: str) -> MatrixTransform | None:
    """What a payload's matrices go through for `layout`: None for native, `to_planar` for planar."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "native":
        return None
    try:
        from mer.quant.planar import to_planar
    except ImportError as error:
        raise ConfigError(f"layout 'planar' needs mer.quant.planar, which cannot be imported ({error})") from error
    return to_planar


def layer_file_name(moe_layer: int) -> str:
    return f"experts-{moe_layer:03d}.bin"


def plan_layers(geometry: Geometry, layer_formats: list[ExpertFormat], blocks: list[int]) -> tuple[LayerEntry, ...]:
    """One LayerEntry per MoE layer: file name, expert stride (page-rounded payload) and format."""
    if len(layer_formats) != geometry.num_moe_layers or len(blocks) != geometry.num_moe_layers:
        raise StoreError(
            f"{len(layer_formats)} layer formats / {len(blocks)} block indices for {geometry.num_moe_layers} MoE layers"
        )
    return tuple(
        LayerEntry(index, block, layer_file_name(index), round_up(expert_format.payload_nbytes), expert_format)
        for index, (expert_format, block) in enumerate(zip(layer_formats, blocks))
    )


def check_free_space(directory: Path, needed: int) -> None:
    usage = shutil.disk_usage(directory)
    if usage.free < needed + SPACE_MARGIN_BYTES:
        raise DiskSpaceError(
            f"{directory}: the store needs {needed / 2**30:.2f} GiB (+{SPACE_MARGIN_BYTES >> 20} MiB margin), "
            f"only {usage.free / 2**30:.2f} GiB free"
        )


@contextmanager
def naming_write_errors(out: Path, path: Path) -> Iterator[None]:
    """An OSError while writing `path` of store `out` as a StoreError naming both (a DiskSpaceError
    when the disk is full): a write to a descriptor does not say which file it was."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(f"{out}: the disk is full: no space left while writing {path}; "
                                 "the partial store was removed") from error
        raise StoreError(f"{out}: cannot write the store: {describe_os_error(error, path)}") from error


class StoreWriter:
    def __init__(self, out: str | os.PathLike, geometry: Geometry, layer_formats: list[ExpertFormat],
                 source: SourceInfo, *, blocks: list[int] | None = None, layout: str = "native", force: bool = False,
                 verify_progress: Callable[[int], None] | None = None, shard: ShardInfo | None = None):
        """`verify_progress(nbytes)` is called as the final read-back check gets through payloads. With
        `shard`, the store holds only `shard.experts`: each layer file has just those of its layer, one
        after another in id order, and the manifest records the shard."""
        self.out = Path(out)
        self.verify_progress = verify_progress
        self.geometry = geometry
        self.layout = layout
        self.source = source
        self.force = force
        self.layers = plan_layers(geometry, layer_formats, blocks or list(range(geometry.num_moe_layers)))
        self.shard = shard
        self.held = list(shard.experts) if shard is not None else list(range(geometry.num_experts))
        self._held_per_layer = [0] * geometry.num_moe_layers
        self._position: dict[int, int] = {}  # expert id -> its index in its layer file
        for expert_id in self.held:
            moe_layer = expert_id // geometry.experts_per_layer
            self._position[expert_id] = self._held_per_layer[moe_layer]
            self._held_per_layer[moe_layer] += 1
        self.temp = partial_dir(self.out)
        self._checksums: dict[int, str] = {}
        self._files: list[tuple[int, bool]] = []  # (fd, opened with O_DIRECT) per layer
        self._staging: np.ndarray | None = None

    @property
    def total_nbytes(self) -> int:
        return sum(layer.expert_stride * count for layer, count in zip(self.layers, self._held_per_layer))

    def __enter__(self) -> "StoreWriter":
        reclaim_dead_partials(self.out.parent)  # what killed writers left, before the space is counted
        if self.out.exists() and not self.force:
            raise StoreExistsError(f"{self.out}: output already exists (use --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(self.out.parent, self.total_nbytes)
        shutil.rmtree(self.temp, ignore_errors=True)
        try:  # from the mkdir on: a SIGTERM unwinding right after it must not leave the directory
            with naming_write_errors(self.out, self.temp):
                self.temp.mkdir()
            for layer in self.layers:
                with naming_write_errors(self.out, self.temp / layer.file):
                    fd, is_direct = open_direct(self.temp / layer.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    self._files.append((fd, is_direct))
                    os.ftruncate(fd, layer.expert_stride * self._held_per_layer[layer.moe_layer])
        except BaseException:
            self._abort()
            raise
        return self

    def write_expert(self, expert_id: int, payload) -> None:
        """Write one expert's payload bytes (exactly the layer's payload size)."""
        moe_layer, expert = divmod(expert_id, self.geometry.experts_per_layer)
        layer = self.layers[moe_layer]
        if expert_id not in self._position:
            raise StoreError(f"{self.out}: layer {moe_layer} expert {expert} (id {expert_id}) is not one of the "
                             f"experts of {self.shard.describe() if self.shard else 'the store'}")
        view = memoryview(payload).cast("B")
        if view.nbytes != layer.format.payload_nbytes:
            raise StoreError(
                f"layer {moe_layer} expert {expert} (id {expert_id}): payload of {view.nbytes} bytes, "
                f"expected {layer.format.payload_nbytes}"
            )
        self._checksums[expert_id] = payload_checksum(view)
        fd, is_direct = self._files[moe_layer]
        data = np.frombuffer(view, dtype=np.uint8)
        if is_direct and not is_page_aligned(data):
            data = self._stage(data, layer.expert_stride)
        with naming_write_errors(self.out, self.temp / layer.file):
            pwrite_all(fd, data, self._position[expert_id] * layer.expert_stride)

    def _stage(self, data: np.ndarray, stride: int) -> np.ndarray:
        """Copy a payload into the aligned staging buffer, zero-padded to the expert stride."""
        if self._staging is None or self._staging.nbytes < stride:
            self._staging = page_aligned_empty(max(layer.expert_stride for layer in self.layers))
        staged = self._staging[:stride]
        staged[: data.nbytes] = data
        staged[data.nbytes :] = 0
        return staged

    def manifest(self) -> Manifest:
        per_layer = self.geometry.experts_per_layer
        experts = tuple(
            ExpertEntry(expert_id, *divmod(expert_id, per_layer),
                        self._position[expert_id] * self.layers[expert_id // per_layer].expert_stride,
                        self._checksums[expert_id])
            for expert_id in self.held
        )
        files = tuple(FileEntry(layer.file, layer.expert_stride * count)
                      for layer, count in zip(self.layers, self._held_per_layer))
        return Manifest(self.geometry, self.layout, self.layers, experts, files, self.source,
                        created_by=f"mer {__version__}", shard=self.shard)

    def _finish(self) -> None:
        for (fd, _), layer in zip(self._files, self.layers):
            with naming_write_errors(self.out, self.temp / layer.file):
                os.fsync(fd)
        self._close_files()
        missing = [i for i in self.held if i not in self._checksums]
        if missing:
            raise StoreError(f"{self.out}: {len(missing)} experts were never written (first: id {missing[0]})")
        manifest = self.manifest()
        manifest.validate()
        self._verify_written(manifest)
        with naming_write_errors(self.out, self.temp / MANIFEST_NAME):
            manifest.save(self.temp)
        if self.out.exists():
            shutil.rmtree(self.out)
        with naming_write_errors(self.out, self.temp):
            os.rename(self.temp, self.out)

    def _verify_written(self, manifest: Manifest) -> None:
        """Re-read every payload from disk and compare it with the checksum taken when written."""
        from mer.store.verify import find_bad_experts

        bad = find_bad_experts(self.temp, manifest, self.verify_progress)
        if bad:
            raise StoreError(f"{self.out}: {len(bad)} experts read back wrong after writing: "
                             + ", ".join(manifest.describe(i) for i in bad[:5]))

    def _close_files(self) -> None:
        while self._files:
            os.close(self._files.pop()[0])

    def _abort(self) -> None:
        self._close_files()
        shutil.rmtree(self.temp, ignore_errors=True)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()


