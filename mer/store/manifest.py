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

    @property
    def slot_nbytes(self) -> int:
        """Size of a cache slot: the largest read of any expert (a multiple of 4096)."""
        return max(layer.format.read_nbytes for layer in self.layers)

    def layer_of(self, expert_id: int) -> LayerEntry:
        return self.layers[self.expert(expert_id).moe_layer]

    def expert(self, expert_id: int) -> ExpertEntry:
        if not 0 <= expert_id < len(self.experts):
            raise StoreError(f"expert id {expert_id} is out of range 0..{len(self.experts) - 1}")
        return self.experts[expert_id]

    def expert_id(self, moe_layer: int, expert: int) -> int:
        return moe_layer * self.geometry.experts_per_layer + expert

    def describe(self, expert_id: int) -> str:
        entry = self.expert(expert_id)
        return f"layer {entry.moe_layer} expert {entry.expert} (id {entry.id})"

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
        if len(self.experts) != geometry.num_experts:
            raise StoreError(f"{where}: {len(self.experts)} experts listed, geometry says {geometry.num_experts}")
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
        for index, entry in enumerate(self.experts):
            expected = (index // geometry.experts_per_layer, index % geometry.experts_per_layer)
            if entry.id != index or (entry.moe_layer, entry.expert) != expected:
                raise StoreError(f"{where}: experts[{index}] is {entry}, expected id {index} at {expected}")
            layer = self.layers[entry.moe_layer]
            if entry.offset % PAGE_SIZE or entry.offset + layer.format.read_nbytes > file_sizes[layer.file]:
                raise StoreError(f"{where}: experts[{index}].offset {entry.offset} is not a valid read in {layer.file}")

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
