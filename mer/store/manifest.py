"""The expert store's manifest: a versioned JSON file describing geometry, layout and checksums.

A store directory holds `manifest.json` and one payload file per MoE layer. Expert `e` of MoE
layer `m` has the global id `m * experts_per_layer + e` (MoE layers are counted without the dense
ones) and its payload starts at `offset` in its layer's file, on a 4096-byte boundary, so one
O_DIRECT read of `format.read_nbytes` bytes lands it in a slot. Layer files are padded so that
every read stays inside the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from mer.errors import ShapeError, StoreError, describe_os_error
from mer.compute.expert_format import PAGE_SIZE, ExpertFormat, MatrixSpec
from mer.store.json_fields import FieldError, JsonObject, checked_integer, checked_text

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "crc32"
MAX_MANIFEST_BYTES = 64 * 2**20  # ~50 bytes per expert: a million experts fit


def is_plain_file_name(name: str) -> bool:
    """A name of a file in the store directory itself (no separator, not `.` or `..`, not empty)."""
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


@dataclass(frozen=True)
class Geometry:
    """Model geometry as far as experts are concerned."""

    architecture: str
    num_layers: int  # transformer blocks in the model, dense ones included
    num_moe_layers: int
    experts_per_layer: int
    top_k: int
    d_model: int
    d_ff: int

    @property
    def num_experts(self) -> int:
        return self.num_moe_layers * self.experts_per_layer


@dataclass(frozen=True)
class LayerEntry:
    """One MoE layer: its block index in the model, payload file and expert byte layout."""

    moe_layer: int
    block: int
    file: str
    expert_stride: int
    format: ExpertFormat


@dataclass(frozen=True)
class ExpertEntry:
    id: int
    moe_layer: int
    expert: int
    offset: int
    checksum: str


@dataclass(frozen=True)
class FileEntry:
    name: str
    nbytes: int


@dataclass(frozen=True)
class SourceFileStat:
    """One source file as `stat` saw it: a rewrite or touch changes `mtime_ns`, a copy `inode`."""

    nbytes: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class SourceInfo:
    """Where the experts came from: a GGUF (paths, sizes, content hash, fingerprint and file stats) or a
    synthetic generator. `hash` is the full identity (`mer.store.gguf_identity`); `fingerprint`
    (`mer.store.gguf_fingerprint`) and `stats` (one per path) find the store at start-up without
    reading the model. Stores converted before they existed have them empty."""

    kind: str  # "gguf" or "synth"
    paths: tuple[str, ...] = ()
    nbytes: int = 0
    hash: str = ""
    parameters: dict = field(default_factory=dict)
    fingerprint: str = ""
    stats: tuple[SourceFileStat, ...] = ()


@dataclass(frozen=True)
class ShardInfo:
    """What a shard store holds: shard `index` of `count` under the shard map whose identity is
    `map_hash` (SHA-256 of its canonical JSON, `mer.cluster.shard_map.shard_map_hash`), `replicas` copies
    per expert in that map, and the global ids of the experts held, ascending."""

    index: int
    count: int
    map_hash: str
    replicas: int
    experts: tuple[int, ...]

    def describe(self) -> str:
        return f"shard {self.index}/{self.count} (shard map {self.map_hash[:16]})"


@dataclass(frozen=True)
class Manifest:
    geometry: Geometry
    layout: str
    layers: tuple[LayerEntry, ...]
    experts: tuple[ExpertEntry, ...]
    files: tuple[FileEntry, ...]
    source: SourceInfo
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    shard: ShardInfo | None = None  # None: a whole store, every expert

    @property
    def slot_nbytes(self) -> int:
        """Size of a cache slot: the largest read of any expert (a multiple of 4096)."""
        return max(layer.format.read_nbytes for layer in self.layers)

    def layer_of(self, expert_id: int) -> LayerEntry:
        return self.layers[self.expert(expert_id).moe_layer]

    @cached_property
    def _entries_by_id(self) -> dict[int, ExpertEntry]:
        return {entry.id: entry for entry in self.experts}

    def holds(self, expert_id: int) -> bool:
        """Whether this store has `expert_id`'s payload (every expert of a whole store)."""
        return expert_id in self._entries_by_id if self.shard is not None else 0 <= expert_id < len(self.experts)

    def expert(self, expert_id: int) -> ExpertEntry:
        """The entry of `expert_id`; StoreError when it is out of range, or not held by a shard store."""
        if not 0 <= expert_id < self.geometry.num_experts:
            raise StoreError(f"expert id {expert_id} is out of range 0..{self.geometry.num_experts - 1}")
        if self.shard is None:
            return self.experts[expert_id]
        entry = self._entries_by_id.get(expert_id)
        if entry is None:
            raise StoreError(f"{self.describe(expert_id)} is not in this store: it holds only the "
                             f"{len(self.experts)} experts of {self.shard.describe()}")
        return entry

    def expert_id(self, moe_layer: int, expert: int) -> int:
        return moe_layer * self.geometry.experts_per_layer + expert

    def held_in_layer(self, moe_layer: int) -> list[ExpertEntry]:
        """The entries of the experts this store holds in `moe_layer`, by expert index."""
        return [entry for entry in self.experts if entry.moe_layer == moe_layer]

    def describe(self, expert_id: int) -> str:
        moe_layer, expert = divmod(expert_id, self.geometry.experts_per_layer)
        return f"layer {moe_layer} expert {expert} (id {expert_id})"

    def total_payload_nbytes(self) -> int:
        return sum(self.layer_of(e.id).format.payload_nbytes for e in self.experts)

    def validate(self, where: str = MANIFEST_NAME) -> None:
        """Check internal consistency; raise StoreError naming the field at fault."""
        geometry = self.geometry
        if self.format_version != FORMAT_VERSION:
            raise StoreError(
                f"{where}: store format version {self.format_version}, this mer reads {FORMAT_VERSION}"
            )
        self._validate_geometry(where)
        if len(self.layers) != geometry.num_moe_layers:
            raise StoreError(f"{where}: {len(self.layers)} layers listed, geometry says {geometry.num_moe_layers}")
        held = self._validate_shard(where)
        if len(self.experts) != len(held):
            raise StoreError(f"{where}: {len(self.experts)} experts listed, "
                             + (f"shard.experts lists {len(held)}" if self.shard else f"geometry says {len(held)}"))
        for index, entry in enumerate(self.files):
            if not is_plain_file_name(entry.name):
                raise StoreError(f"{where}: files[{index}].name {entry.name!r} is not a plain file name in the store "
                                 "directory")
        file_sizes = {entry.name: entry.nbytes for entry in self.files}
        for index, layer in enumerate(self.layers):
            if layer.moe_layer != index:
                raise StoreError(f"{where}: layers[{index}].moe_layer is {layer.moe_layer}")
            if layer.block >= geometry.num_layers:
                raise StoreError(f"{where}: layers[{index}].block is {layer.block}, the model has "
                                 f"{geometry.num_layers} blocks (geometry.num_layers)")
            if layer.file not in file_sizes:
                raise StoreError(f"{where}: layers[{index}].file {layer.file!r} is not in files")
            if layer.expert_stride % PAGE_SIZE or layer.expert_stride < layer.format.read_nbytes:
                raise StoreError(f"{where}: layers[{index}].expert_stride {layer.expert_stride} is not valid")
            try:
                layer.format.validate()
            except ShapeError as error:
                raise StoreError(f"{where}: layers[{index}].format: {error}") from None
            for name in ("d_model", "d_ff"):  # the payload sizes follow the format: it must match the geometry
                if getattr(layer.format, name) != getattr(geometry, name):
                    raise StoreError(
                        f"{where}: geometry.{name} is {getattr(geometry, name)} but layers[{index}].format.{name} "
                        f"is {getattr(layer.format, name)} (its payloads are {layer.format.payload_nbytes} bytes); "
                        "the manifest contradicts itself")
        for index, (entry, expert_id) in enumerate(zip(self.experts, held)):
            expected = divmod(expert_id, geometry.experts_per_layer)
            if entry.id != expert_id or (entry.moe_layer, entry.expert) != expected:
                raise StoreError(f"{where}: experts[{index}] is {entry}, expected id {expert_id} at {expected}")
            layer = self.layers[entry.moe_layer]
            if entry.offset % PAGE_SIZE or entry.offset + layer.format.read_nbytes > file_sizes[layer.file]:
                raise StoreError(f"{where}: experts[{index}].offset {entry.offset} is not a valid read in {layer.file}")

    def _validate_shard(self, where: str) -> list[int] | range:
        """The ids the store must list: every expert, or a shard's (checked: in range, ascending, distinct)."""
        if self.shard is None:
            return range(self.geometry.num_experts)
        shard = self.shard
        if type(shard.count) is not int or shard.count < 1:
            raise StoreError(f"{where}: shard.count is {shard.count!r}, not a positive integer")
        if type(shard.index) is not int or not 0 <= shard.index < shard.count:
            raise StoreError(f"{where}: shard.index is {shard.index!r}, not in 0..{shard.count - 1}")
        if type(shard.replicas) is not int or not 1 <= shard.replicas <= shard.count:
            raise StoreError(f"{where}: shard.replicas is {shard.replicas!r}, not in 1..{shard.count}")
        ids = list(shard.experts)
        if any(type(i) is not int or not 0 <= i < self.geometry.num_experts for i in ids) \
                or any(b <= a for a, b in zip(ids, ids[1:])):
            raise StoreError(f"{where}: shard.experts must be distinct ascending expert ids in "
                             f"0..{self.geometry.num_experts - 1}")
        return ids

    def _validate_geometry(self, where: str) -> None:
        """Every geometry field a positive integer, and the counts consistent with each other."""
        geometry = self.geometry
        for name in ("num_layers", "num_moe_layers", "experts_per_layer", "top_k", "d_model", "d_ff"):
            value = getattr(geometry, name)
            if type(value) is not int or value < 1:
                raise StoreError(f"{where}: geometry.{name} is {value!r}, not a positive integer")
        if geometry.top_k > geometry.experts_per_layer:
            raise StoreError(f"{where}: geometry.top_k {geometry.top_k} exceeds experts_per_layer "
                             f"{geometry.experts_per_layer}")
        if geometry.num_moe_layers > geometry.num_layers:
            raise StoreError(f"{where}: geometry.num_moe_layers {geometry.num_moe_layers} exceeds num_layers "
                             f"{geometry.num_layers}")

    def to_json(self) -> str:
        data = {
            "mer_store": self.format_version,
            "created_by": self.created_by,
            "checksum_algorithm": self.checksum_algorithm,
            "layout": self.layout,
            "geometry": asdict(self.geometry),
            "slot_nbytes": self.slot_nbytes,
            "source": asdict(self.source),
            "files": [asdict(entry) for entry in self.files],
            "layers": [{**asdict(layer), "format": layer.format.to_dict()} for layer in self.layers],
            "experts": [[e.id, e.moe_layer, e.expert, e.offset, e.checksum] for e in self.experts],
        }
        if self.shard is not None:  # absent from a whole store's manifest (unchanged format)
            data["shard"] = {"index": self.shard.index, "count": self.shard.count, "map_hash": self.shard.map_hash,
                             "replicas": self.shard.replicas, "experts": list(self.shard.experts)}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> "Manifest":
        """The manifest in `text`; StoreError naming `where` and the field for anything malformed."""
        try:
            data = JsonObject(json.loads(text))
            if data.data.get("mer_store") != FORMAT_VERSION:
                raise StoreError(
                    f"{where}: store format version {data.data.get('mer_store')!r}, this mer reads {FORMAT_VERSION}"
                )
            manifest = cls(
                geometry=_geometry(data.object("geometry")),
                layout=data.text("layout"),
                layers=tuple(_layer(layer) for layer in data.objects("layers")),
                experts=tuple(_expert(row, f"experts[{index}]") for index, row in enumerate(data.array("experts"))),
                files=tuple(FileEntry(entry.text("name"), entry.integer("nbytes")) for entry in data.objects("files")),
                source=_source(data.object("source")),
                created_by=data.text("created_by", ""),
                format_version=FORMAT_VERSION,
                checksum_algorithm=data.text("checksum_algorithm"),
                shard=_shard(data.object("shard")) if "shard" in data.data else None,
            )
        except StoreError:
            raise
        except ShapeError as error:
            raise StoreError(f"{where}: {error}") from None
        except FieldError as error:
            raise StoreError(f"{where}: malformed manifest: {error}") from None
        except RecursionError:
            raise StoreError(f"{where}: malformed manifest (JSON nested too deeply)") from None
        except (KeyError, TypeError, ValueError) as error:  # JSON syntax, an unknown dtype name
            raise StoreError(f"{where}: malformed manifest ({type(error).__name__}: {error})") from None
        manifest.validate(where)
        return manifest

    def save(self, directory: Path) -> None:
        """Write `manifest.json` atomically: a temporary file beside it, flushed, then renamed over it,
        so a reader (or a crash) sees the old manifest or the new one, never a part."""
        path = Path(directory) / MANIFEST_NAME
        temporary = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        try:
            with open(temporary, "w") as handle:
                handle.write(self.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            if (nbytes := path.stat().st_size) > MAX_MANIFEST_BYTES:
                raise StoreError(f"{path}: the manifest is {nbytes} bytes, more than any store's "
                                 f"({MAX_MANIFEST_BYTES}): not a manifest mer wrote")
            text = path.read_text()
        except (FileNotFoundError, IsADirectoryError):
            raise StoreError(f"{directory}: not an expert store (no {MANIFEST_NAME})") from None
        except OSError as error:  # permission denied (on the file or the directory), I/O error
            raise StoreError(f"cannot read the manifest: {describe_os_error(error, path)}") from error
        except UnicodeDecodeError as error:
            raise StoreError(f"{path}: malformed manifest (not UTF-8 text: {error})") from error
        return cls.from_json(text, where=str(path))


def _geometry(data: JsonObject) -> Geometry:
    return Geometry(data.text("architecture"), *(data.integer(name) for name in (
        "num_layers", "num_moe_layers", "experts_per_layer", "top_k", "d_model", "d_ff")))


def _layer(data: JsonObject) -> LayerEntry:
    expert_format = data.object("format")
    matrices = tuple(MatrixSpec(matrix.text("name"), matrix.text("dtype"), matrix.integer("rows"),
                                matrix.integer("columns"), matrix.integer("offset"), matrix.integer("nbytes"),
                                matrix.text("layout", "native"))
                     for matrix in expert_format.objects("matrices"))
    if len(matrices) != 3:
        raise FieldError(f"{expert_format.path}.matrices lists {len(matrices)} matrices, an expert has 3")
    layer_format = ExpertFormat(expert_format.integer("d_model"), expert_format.integer("d_ff"), matrices,
                                expert_format.text("activation", "silu"), _flag(expert_format, "has_biases"))
    layer_format.validate()
    return LayerEntry(data.integer("moe_layer"), data.integer("block"), data.text("file"),
                      data.integer("expert_stride"), layer_format)


def _flag(data: JsonObject, name: str) -> bool:
    """An optional boolean field (false when absent)."""
    value = data.data.get(name, False)
    if not isinstance(value, bool):
        raise FieldError(f"{data.path}.{name} is {value!r}, expected true or false")
    return value


def _expert(row, path: str) -> ExpertEntry:
    if not isinstance(row, list) or len(row) != 5:
        raise FieldError(f"{path} is not a list [id, moe_layer, expert, offset, checksum]")
    names = ("id", "moe_layer", "expert", "offset")
    values = [checked_integer(value, f"{path}[{index}] ({name})") for index, (name, value) in enumerate(zip(names, row))]
    return ExpertEntry(*values, checked_text(row[4], f"{path}[4] (checksum)"))


def _source(data: JsonObject) -> SourceInfo:
    parameters = data.data.get("parameters", {})
    if not isinstance(parameters, dict):
        raise FieldError(f"source.parameters is {parameters!r}, expected a JSON object")
    paths = data.array("paths")
    return SourceInfo(data.text("kind"), tuple(checked_text(path, f"source.paths[{index}]") for index, path in enumerate(paths)),
                      data.integer("nbytes"), data.text("hash"), parameters, data.text("fingerprint", ""),
                      tuple(SourceFileStat(stat.integer("nbytes"), stat.integer("mtime_ns", -2**63), stat.integer("inode"))
                            for stat in data.objects("stats", [])))


def _shard(data: JsonObject) -> ShardInfo:
    experts = data.array("experts")
    return ShardInfo(data.integer("index"), data.integer("count"), data.text("map_hash"), data.integer("replicas"),
                     tuple(checked_integer(value, f"shard.experts[{index}]") for index, value in enumerate(experts)))
