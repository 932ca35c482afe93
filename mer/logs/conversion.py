"""A conversion's summary from its events (`mer-pipeline convert --log-file`).

- `layers_done`, `experts`, `tensors`, `bytes`: counts and sums over `convert_layer_done` (one per MoE
  layer copied; `tensors` counts the GGUF tensors the experts were copied from: 3 per layer for
  merged expert tensors, 3 per expert for per-expert ones), checked against `convert_done`'s
  `experts` and `bytes`;
- `seconds`: `convert_done.seconds` (from the start of the conversion to the store renamed into
  place); for a conversion that did not finish, the time from `convert_started.t_start` to its last
  event, with a warning; `mb_per_s` = bytes / 10^6 / seconds, the rate `convert` prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mer.errors import EventLogError
from mer.logs.runs import RunLog
from mer.metrics.summary import MIB

CONVERT_STARTED = "convert_started"
CONVERT_LAYER_DONE = "convert_layer_done"
CONVERT_DONE = "convert_done"


@dataclass(frozen=True)
class ConversionLogSummary:
    model: str
    out: str
    layout: str
    finished: bool
    moe_layers: int  # in the model
    layers_done: int
    experts: int  # expert payloads written
    tensors: int  # GGUF tensors copied from
    bytes: int  # expert payload bytes written
    seconds: float
    mb_per_s: float

    def to_json_dict(self) -> dict[str, Any]:
        return {"kind": "convert", **asdict(self)}


@dataclass
class RecomputedConversion:
    summary: ConversionLogSummary
    warnings: list[str]


def _integer(event: dict[str, Any], name: str, where: str) -> int:
    value = event.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EventLogError(f"{where}: field {name!r} is {value!r}, expected an integer >= 0")
    return value


def summarize_conversion(run: RunLog) -> RecomputedConversion:
    """The summary of the conversion in `run` (see the module docstring)."""
    started, done = run.last(CONVERT_STARTED), run.last(CONVERT_DONE)
    if started is None:
        raise EventLogError(f"{run.label}: no {CONVERT_STARTED} event: the conversion never started copying "
                            "(or the log was written by an older mer)")
    layers = [(line, event) for line, event in run.with_lines(CONVERT_LAYER_DONE)]
    counts = {name: sum(_integer(event, name, f"{run.path}:{line} ({CONVERT_LAYER_DONE})") for line, event in layers)
              for name in ("experts", "tensors", "bytes")}
    warnings = []
    if done is not None:
        seconds = done.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise EventLogError(f"{run.label} ({CONVERT_DONE}): field 'seconds' is {seconds!r}, expected a number")
        differing = [f"{name} ({counts[name]} in {CONVERT_LAYER_DONE}, {done.get(name)!r} logged)"
                     for name in ("experts", "bytes") if done.get(name) != counts[name]]
        if differing:
            warnings.append(f"{run.label}: the layers logged differ from {CONVERT_DONE} in {', '.join(differing)}")
    else:
        seconds = max(event["t_mono"] for event in run.events) - started.get("t_start", started["t_mono"])
        warnings.append(f"{run.label}: no {CONVERT_DONE} event: the conversion did not finish (interrupted or "
                        f"failed) after {len(layers)} of {started.get('moe_layers')} MoE layers; nothing was "
                        "renamed into place")
    summary = ConversionLogSummary(
        model=str(started.get("model")), out=str(started.get("out")), layout=str(started.get("layout")),
        finished=done is not None, moe_layers=_integer(started, "moe_layers", f"{run.label} ({CONVERT_STARTED})"),
        layers_done=len(layers), **counts, seconds=float(seconds),
        mb_per_s=counts["bytes"] / 1e6 / seconds if seconds > 0 else 0.0)
    return RecomputedConversion(summary, warnings)


def format_conversion(summary: ConversionLogSummary) -> str:
    s = summary
    state = "done" if s.finished else "did not finish"
    return "\n".join([
        f"conversion of {s.model} into {s.out} (layout {s.layout}): {state}",
        f"written: {s.experts} experts from {s.tensors} tensors, {s.bytes / MIB:.2f} MiB ({s.bytes} bytes), "
        f"{s.layers_done} of {s.moe_layers} MoE layers",
        f"time: {s.seconds:.3f} s, {s.mb_per_s:.0f} MB/s",
    ])
