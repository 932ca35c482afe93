"""Malformed store manifests, fuzzed with hypothesis: any field replaced by a value of another type or an
absurd one (huge, negative, NaN, infinite, a path out of the store), fields and list items deleted,
the text truncated or its bytes changed, JSON nested too deep; and a manifest file far too large.

The store is a real one (a tiny MoE GGUF converted by `convert_gguf`). Each case goes through what
`store info`, `store verify` and `run` do first: `ExpertStore.open` (the manifest parsed and
validated, every payload file checked) and `verify_store` (every payload read and checksummed).
Each either succeeds or raises one of mer's errors on one line naming the manifest (or the store's
file at fault); never another exception, never more than `MEMORY_LIMIT` of allocations.
Found by this fuzzing and fixed: tracebacks for a string offset (`TypeError`), an infinite `d_ff`
(`OverflowError`), a null file size (`TypeError`) and JSON nested too deep (`RecursionError`); a
negative offset and payload file names leading out of the store directory (`../x`) were accepted.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import strategies as st

from mer.errors import MerError, StoreError
from mer.store.convert import convert_gguf
from mer.store.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from mer.store.reader import ExpertStore
from mer.store.summary import store_summary
from mer.store.verify import verify_store
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.resource_bounds import bounded, check_fuzz_case, fuzz_test

MEMORY_LIMIT = 64 * 2**20
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, -4096, 1, 4095, 4096, 2**31, 2**32, 2**63, 2**64, 10**30]),
    st.text(max_size=12), st.sampled_from(["../manifest.json", "/etc/passwd", "", ".", "..", "a/b", "q4_0", "f32",
                                           "planar", "native", "experts-000.bin", "crc32"]),
    st.lists(st.integers(-5, 10), max_size=6), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


class Store(NamedTuple):
    directory: Path
    manifest: dict[str, Any]
    paths: list[tuple]  # the path (keys and indexes) of every value in the manifest

    def __repr__(self) -> str:
        return f"Store({self.directory})"


def value_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix] if prefix else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        paths.extend(value_paths(child, prefix + (key,)))
    return paths


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    workdir = tmp_path_factory.mktemp("manifest")
    model = write_tiny_moe_gguf(workdir / "tiny.gguf", arch="llama", dtypes=("q8_0", "q4_0", "f16"), n_layers=2,
                                n_experts=4, top_k=2, d_model=64, d_ff=64, vocab_size=300, seed=2)
    convert_gguf(model.path, workdir / "store")
    manifest = json.loads((workdir / "store" / MANIFEST_NAME).read_text())
    return Store(workdir / "store", manifest, value_paths(manifest))


def with_value(document: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """A copy of `document` with the value at `path` replaced (or deleted); unchanged when an earlier
    change removed the path."""
    changed = copy.deepcopy(document)
    parent = changed
    try:
        for key in path[:-1]:
            parent = parent[key]
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return document
    return changed


@st.composite
def malformed(draw, store: Store) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["value", "value", "values", "delete", "truncated", "bytes", "nested"]))
    text = json.dumps(store.manifest, indent=1)
    if kind == "truncated":
        return kind, text.encode()[: draw(st.integers(0, len(text) - 1))]
    if kind == "bytes":
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(data)
    if kind == "nested":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return kind, ('{"mer_store": 1, "geometry": ' + "[" * depth + "]" * depth + "}").encode()
    document = store.manifest
    for _ in range(draw(st.integers(2, 4)) if kind == "values" else 1):
        path = draw(st.sampled_from(store.paths))
        document = with_value(document, path, draw(ODD_VALUES), delete=kind == "delete")
    return kind, json.dumps(document, indent=1).encode()


def open_and_verify(directory: Path) -> str:
    """`store info`'s and `store verify`'s (and `run`'s) reading of the store: 'ok' or the error's name."""
    try:
        summary = store_summary(ExpertStore.open(directory))
        json.dumps(summary)
        verify_store(directory)
    except Exception as error:  # noqa: BLE001 (checked: only mer's errors, naming the manifest or the store)
        assert isinstance(error, MerError), f"{type(error).__name__}: {error}"
        message = str(error)
        assert str(directory) in message and "\n" not in message, message
        return type(error).__name__
    return "ok"


@fuzz_test(max_examples=100)  # slow: 5-30 s on two busy cores
def test_a_malformed_manifest_gives_a_clear_error_with_bounded_memory(store, tmp_path, data):
    kind, content = data.draw(malformed(store))
    directory = tmp_path / "store"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(store.directory, directory)
    (directory / MANIFEST_NAME).write_bytes(content)
    check_fuzz_case(kind, lambda: open_and_verify(directory), MEMORY_LIMIT)


def test_the_unmodified_store_opens_and_verifies(store):
    assert open_and_verify(store.directory) == "ok"


@pytest.mark.parametrize(("changes", "message"), [
    ({("experts", 1, 3): "4096"}, "experts[1][3] (offset) is '4096', expected an integer >= 0"),
    ({("experts", 1, 3): -4096}, "experts[1][3] (offset) is -4096, expected an integer >= 0"),
    ({("layers", 0, "format", "d_ff"): float("inf")}, "layers[0].format.d_ff is inf, expected an integer >= 0"),
    ({("layers", 0, "expert_stride"): 8192.0}, "layers[0].expert_stride is 8192.0, expected an integer >= 0"),
    ({("files", 0, "nbytes"): None}, "files[0].nbytes is None, expected an integer >= 0"),
    ({("files", 0, "name"): "../x.bin", ("layers", 0, "file"): "../x.bin"},
     "files[0].name '../x.bin' is not a plain file name"),
], ids=["string offset", "negative offset", "infinite d_ff", "float stride", "null size", "file outside"])
def test_what_the_fuzzing_found_is_named(store, tmp_path, changes, message):
    directory = tmp_path / "store"
    shutil.copytree(store.directory, directory)
    document = store.manifest
    for path, value in changes.items():
        document = with_value(document, path, value)
    (directory / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(StoreError) as caught:
        ExpertStore.open(directory)
    assert str(caught.value).startswith(f"{directory / MANIFEST_NAME}: ") and message in str(caught.value)


def test_json_nested_too_deep_and_a_giant_manifest_are_refused(store, tmp_path):
    directory = tmp_path / "store"
    shutil.copytree(store.directory, directory)
    (directory / MANIFEST_NAME).write_text('{"mer_store": 1, "geometry": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(StoreError, match="malformed manifest"):
        Manifest.load(directory)
    with open(directory / MANIFEST_NAME, "wb") as handle:  # sparse: no disk space used
        handle.truncate(MAX_MANIFEST_BYTES + 1)
    with bounded() as peak:
        with pytest.raises(StoreError, match=f"the manifest is {MAX_MANIFEST_BYTES + 1} bytes, more than any store's"):
            Manifest.load(directory)
    assert peak() < 2**20
