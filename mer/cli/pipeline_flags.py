"""The flags shared by `mer-pipeline run` and `up`: one per configuration key, help from the config."""

from __future__ import annotations

import argparse
from pathlib import Path

from mer.config import settings

# key -> (argparse type, metavar, unit shown in help)
_FLAG_TYPES = {
    "tokens": (int, "N", "iterations"),
    "cache_slots": (int, "C", "slots"),
    "top_k": (int, "K", "experts"),
    "workload": (str, "NAME", ""),
    "zipf_s": (float, "S", ""),
    "workload_correlation": (float, "P", "probability 0..1"),
    "trace": (Path, "FILE", ""),
    "seed": (int, "S", ""),
    "predict_fanout": (int, "F", "experts"),
    "pipeline_depth": (int, "D", "iterations"),
    "predictors": (str, "NAME[,NAME...]", ""),
    "gate_min_ratio": (float, "R", "x uniform probability"),
    "gate_model": (Path, "MODEL.gguf", ""),
    "max_pinned": (int, "P", "experts"),
    "governor_threshold": (float, "G", "usefulness per pending read"),
    "compute_workers": (str, "N|auto", "processes"),
    "kernel_threads": (int, "T", "threads per worker"),
    "io_backend": (str, "NAME", ""),
    "cache_policy": (str, "NAME", ""),
    "io_queue_depth": (int, "Q", "reads in flight"),
    "log_file": (Path, "FILE", ""),
    "record_trace": (Path, "FILE", ""),
    "dump_outputs": (Path, "FILE", ""),
    "handshake_timeout_s": (float, "SECONDS", "s"),
    "shutdown_grace_s": (float, "SECONDS", "s"),
}


def _help(key: str, unit: str) -> str:
    rule = settings()[key]
    text = rule.doc
    if rule.choices:
        text += f" One of: {', '.join(rule.choices)}."
    elif rule.minimum is not None:
        text += f" Range {rule.minimum}..{rule.maximum}" + (f" ({unit})." if unit else ".")
    return text


def add_pipeline_flags(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per run setting (all default to None: the config file decides)."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML configuration (configs/*.toml); flags override its keys.")
    for key, (kind, metavar, unit) in _FLAG_TYPES.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, dest=key, type=kind, metavar=metavar, default=None, help=_help(key, unit))
    parser.add_argument("--layered", dest="layered", action="store_true", default=None,
                        help=settings()["layered"].doc)
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false", default=None,
                        help="Do not read predicted experts ahead (prefetch is on by default).")
    parser.add_argument("--json", action="store_true",
                        help="Print the run summary as one JSON object on stdout (nothing else on stdout).")


def parse_worker_count(value):
    """`auto` or a positive integer, for --compute-workers."""
    return value if value in (None, "auto") else int(value)
