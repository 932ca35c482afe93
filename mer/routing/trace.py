"""Routing traces: JSONL files of routing decisions, written while a run goes and replayed later.

Format (version 1), one JSON object per line:

    {"mer_trace": 1, "layers": L, "experts_per_layer": E, "top_k": k}          <- header, line 1
    {"token": 0, "layer": 0, "experts": [3, 5], "weights": [0.5, 0.5]}       <- one per decision
    ...

Decisions come token by token; within a token every layer 0..L-1 appears exactly once, in order;
token numbers start anywhere and grow by one. `experts` holds k distinct ids within the layer
(0..E-1) and `weights` k finite numbers (gate weights, not required to sum to 1). A flat-pool run
records its pool as one layer: `layers: 1`, `experts_per_layer: num_layers x experts_per_layer`,
layer 0 and global store ids. Extra keys are ignored (room for later additions); blank lines are
skipped. A trace that ends inside a token is malformed.

Optional per decision: `"hidden": "<base64>"`, the token's residual stream at that layer (after
its attention, the input of the layer's ffn_norm) as little-endian float32 values, base64-encoded
(exact and ~4/3 bytes per value: 683 characters for d_model 128). `generate --record-trace FILE
--record-hidden` writes it, so that a replay can run the next-layer gate predictor
(`mer.predict.gate`) on the residuals the model really had. Either every decision of a trace has
it, with one length, or none does.

`TraceWriter` writes a token's lines with one write once the token is complete, so a killed run
leaves a readable trace of the tokens it finished. In an event loop (the router's jobs) use
`await writer.awrite(decision)`: the write runs in aiofiles' thread pool and never blocks the loop;
`write` is the same, blocking, for scripts and tests.
"""

from __future__ import annotations

import base64
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import aiofiles.threadpool
import numpy as np

from mer.errors import TraceError
from mer.routing.space import RoutingDecision, RoutingSpace

TRACE_VERSION = 1


@dataclass(frozen=True)
class TraceHeader:
    """Geometry of the decisions in a trace."""

    layers: int
    experts_per_layer: int
    top_k: int

    @classmethod
    def for_space(cls, space: RoutingSpace) -> "TraceHeader":
        return cls(space.decision_layers, space.experts_per_decision, space.top_k)

    def to_json_dict(self) -> dict:
        return {"mer_trace": TRACE_VERSION, "layers": self.layers,
                "experts_per_layer": self.experts_per_layer, "top_k": self.top_k}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_header(line: str, where: str) -> TraceHeader:
    try:
        data = json.loads(line)
    except ValueError as error:
        raise TraceError(f"{where}: header is not JSON ({error})") from error
    if not isinstance(data, dict) or "mer_trace" not in data:
        raise TraceError(f"{where}: not a mer routing trace (no \"mer_trace\" header)")
    if data["mer_trace"] != TRACE_VERSION:
        raise TraceError(f"{where}: trace version {data['mer_trace']!r}, this mer reads version {TRACE_VERSION}")
    for key in ("layers", "experts_per_layer", "top_k"):
        if not _is_int(data.get(key)) or data[key] < 1:
            raise TraceError(f"{where}: header field {key!r} must be a positive integer, got {data.get(key)!r}")
    if data["top_k"] > data["experts_per_layer"]:
        raise TraceError(f"{where}: header top_k {data['top_k']} exceeds experts_per_layer {data['experts_per_layer']}")
    return TraceHeader(data["layers"], data["experts_per_layer"], data["top_k"])


def check_decision(header: TraceHeader, decision: RoutingDecision, where: str) -> None:
    """Raise TraceError (prefixed with `where`) unless the decision fits the header's geometry."""
    if not _is_int(decision.token) or decision.token < 0:
        raise TraceError(f"{where}: token must be a non-negative integer, got {decision.token!r}")
    if not _is_int(decision.layer) or not 0 <= decision.layer < header.layers:
        raise TraceError(f"{where}: layer {decision.layer!r} is out of range 0..{header.layers - 1}")
    experts = decision.experts
    for name, values in (("experts", experts), ("weights", decision.weights)):
        if len(values) != header.top_k:
            raise TraceError(f"{where}: {len(values)} {name}, the header's top_k is {header.top_k}")
    for expert in experts:
        if not _is_int(expert):
            raise TraceError(f"{where}: expert id {expert!r} is not an integer")
        if not 0 <= expert < header.experts_per_layer:
            raise TraceError(f"{where}: expert id {expert} is out of range 0..{header.experts_per_layer - 1}")
    if len(set(experts)) != len(experts):
        raise TraceError(f"{where}: experts {list(experts)} are not distinct")
    for weight in decision.weights:
        if not _is_number(weight):
            raise TraceError(f"{where}: weight {weight!r} is not a finite number")


def _parse_decision(line: str, header: TraceHeader, where: str) -> RoutingDecision:
    try:
        data = json.loads(line)
    except ValueError as error:
        raise TraceError(f"{where}: not JSON ({error})") from error
    if not isinstance(data, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key in ("token", "layer", "experts", "weights"):
        if key not in data:
            raise TraceError(f"{where}: missing field {key!r}")
    for key in ("experts", "weights"):
        if not isinstance(data[key], list):
            raise TraceError(f"{where}: field {key!r} must be a list, got {data[key]!r}")
    hidden = _parse_hidden(data["hidden"], where) if "hidden" in data else None
    decision = RoutingDecision(data["token"], data["layer"], tuple(data["experts"]), tuple(data["weights"]), hidden)
    check_decision(header, decision, where)
    return decision


def encode_hidden(hidden: np.ndarray) -> str:
    """A residual as the trace stores it: little-endian float32 bytes, base64."""
    return base64.b64encode(np.ascontiguousarray(hidden, dtype="<f4").tobytes()).decode("ascii")


def _parse_hidden(value: object, where: str) -> np.ndarray:
    if not isinstance(value, str):
        raise TraceError(f"{where}: field 'hidden' must be a base64 string of float32 values, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as error:
        raise TraceError(f"{where}: field 'hidden' is not valid base64 ({error})") from error
    if not raw or len(raw) % 4:
        raise TraceError(f"{where}: field 'hidden' holds {len(raw)} bytes, not a whole number of float32 values")
    hidden = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(hidden)):
        raise TraceError(f"{where}: field 'hidden' holds a value that is not finite")
    return hidden


class _DecisionOrder:
    """Checks that decisions come token by token with every layer once, in order."""

    def __init__(self, layers: int):
        self.layers = layers
        self.token: int | None = None
        self.next_layer = 0
        self.hidden_size: int | None | bool = False  # False until the first decision: None = no hidden states

    def check(self, decision: RoutingDecision, where: str) -> None:
        # within a token its number; after one the next number; the first token may have any number
        expected_token = self.token if self.is_inside_token or self.token is None else self.token + 1
        if expected_token is not None and decision.token != expected_token:
            raise TraceError(f"{where}: token {decision.token}, expected token {expected_token}")
        if decision.layer != self.next_layer:
            raise TraceError(
                f"{where}: layer {decision.layer} of token {decision.token}, expected layer {self.next_layer}"
            )
        hidden_size = None if decision.hidden is None else len(decision.hidden)
        if self.hidden_size is not False and hidden_size != self.hidden_size:
            have = "no hidden state" if hidden_size is None else f"a hidden state of {hidden_size} values"
            before = "none" if self.hidden_size is None else f"{self.hidden_size} values"
            raise TraceError(f"{where}: {have}, but the decisions before had {before} (all or none, one length)")
        self.hidden_size = hidden_size
        self.token = decision.token
        self.next_layer = (self.next_layer + 1) % self.layers

    @property
    def is_inside_token(self) -> bool:
        return self.next_layer != 0


def read_trace(path: str | Path) -> tuple[TraceHeader, Iterator[RoutingDecision]]:
    """Open a trace: its header at once, then its decisions lazily, each checked as it is read.

    Errors (TraceError) name the file and the line number: malformed JSON, missing fields, another
    version, ids out of range, a wrong number of experts or weights, decisions out of order, and a
    trace that ends inside a token.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            first_line = _decode(file.readline(), f"{path}:1")
    except OSError as error:
        raise TraceError(f"{path}: cannot read the trace ({error.strerror or error})") from error
    if not first_line.strip():
        raise TraceError(f"{path}:1: empty file, expected the trace header")
    header = _parse_header(first_line, f"{path}:1")
    return header, _iterate_decisions(path, header)


def _decode(raw_line: bytes, where: str) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TraceError(f"{where}: not UTF-8 text ({error.reason})") from error


def _iterate_decisions(path: Path, header: TraceHeader) -> Iterator[RoutingDecision]:
    order = _DecisionOrder(header.layers)
    line_number = 1
    with open(path, "rb") as file:
        file.readline()
        for line_number, raw_line in enumerate(file, start=2):
            where = f"{path}:{line_number}"
            line = _decode(raw_line, where)
            if not line.strip():
                continue
            decision = _parse_decision(line, header, where)
            order.check(decision, where)
            yield decision
    if order.is_inside_token:
        raise TraceError(
            f"{path}:{line_number}: the trace ends inside token {order.token} "
            f"(after layer {order.next_layer - 1} of {header.layers})"
        )


def count_trace_tokens(path: str | Path) -> tuple[TraceHeader, int]:
    """Read a whole trace, checking every line, and return its header and number of tokens."""
    header, decisions = read_trace(path)
    return header, sum(1 for _ in decisions) // header.layers


def _as_python_numbers(decision: RoutingDecision, where: str) -> RoutingDecision:
    """The decision with plain int ids and float weights (numpy scalars are accepted)."""
    try:
        return RoutingDecision(
            operator.index(decision.token), operator.index(decision.layer),
            tuple(operator.index(expert) for expert in decision.experts),
            tuple(float(weight) for weight in decision.weights),
            None if decision.hidden is None else np.asarray(decision.hidden, dtype=np.float32).reshape(-1),
        )
    except (TypeError, ValueError) as error:
        raise TraceError(f"{where}: not a valid decision ({error})") from error


class TraceWriter:
    """Streams routing decisions to a trace file, one write per complete token (see the module docstring).

    Creating it writes the header line; `close()` (or leaving `with` / `async with`) drops an
    unfinished token, so the file always ends on a token boundary and reads back without error."""

    def __init__(self, path: str | Path, header: TraceHeader):
        self.path = Path(path)
        self.header = header
        self._order = _DecisionOrder(header.layers)
        self._pending: list[str] = []
        self.num_tokens_written = 0  # complete tokens written so far
        try:
            self._file = open(self.path, "wb", buffering=0)
        except OSError as error:
            raise TraceError(f"{self.path}: cannot create the trace ({error.strerror or error})") from error
        self._file.write(json.dumps(header.to_json_dict(), separators=(",", ":")).encode() + b"\n")
        self._async_file = aiofiles.threadpool.wrap(self._file)

    @property
    def is_closed(self) -> bool:
        return self._file.closed

    def write(self, decision: RoutingDecision) -> None:
        """Add one decision (checked against the header and the order); write the token at its end."""
        token = self._add(decision)
        if token:
            self._file.write(token)

    async def awrite(self, decision: RoutingDecision) -> None:
        """`write` for an event loop: the token's write runs in aiofiles' thread pool."""
        token = self._add(decision)
        if token:
            await self._async_file.write(token)

    def _add(self, decision: RoutingDecision) -> bytes:
        """Check and queue one decision; the bytes of its token once the token is complete, else b""."""
        if self._file.closed:
            raise TraceError(f"{self.path}: the trace writer is closed")
        where = f"{self.path}: decision for token {decision.token} layer {decision.layer}"
        decision = _as_python_numbers(decision, where)
        check_decision(self.header, decision, where)
        self._order.check(decision, where)
        record = {"token": decision.token, "layer": decision.layer,
                  "experts": list(decision.experts), "weights": list(decision.weights)}
        if decision.hidden is not None:
            record["hidden"] = encode_hidden(decision.hidden)
        self._pending.append(json.dumps(record, separators=(",", ":")) + "\n")
        if self._order.is_inside_token:
            return b""
        token = "".join(self._pending).encode()
        self._pending.clear()
        self.num_tokens_written += 1
        return token

    def close(self) -> None:
        """Close the file (idempotent); an unfinished token is dropped."""
        self._pending.clear()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    async def __aenter__(self) -> "TraceWriter":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()
