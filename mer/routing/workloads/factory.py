"""Making a workload by name, as the `--workload` flag names it."""

from __future__ import annotations

from pathlib import Path

from mer.errors import ConfigError
from mer.routing.space import RoutingSpace
from mer.routing.workloads.base import Workload
from mer.routing.workloads.markov import MarkovWorkload
from mer.routing.workloads.replay import ReplayWorkload
from mer.routing.workloads.skewed import SkewedWorkload
from mer.routing.workloads.uniform import UniformWorkload

WORKLOAD_NAMES = ("markov", "uniform", "skewed", "replay")


def make_workload(name: str, space: RoutingSpace, *, seed: int = 0, zipf_s: float = 1.1,
                  correlation: float = 0.0, trace_path: str | Path | None = None) -> Workload:
    """The workload `name` over `space`: markov, uniform, skewed (zipf_s, correlation) or replay (trace_path)."""
    if name == "markov":
        return MarkovWorkload(space, seed)
    if name == "uniform":
        return UniformWorkload(space, seed)
    if name == "skewed":
        return SkewedWorkload(space, seed, zipf_s=zipf_s, correlation=correlation)
    if name == "replay":
        if trace_path is None:
            raise ConfigError("workload 'replay' needs a trace file (--trace FILE)")
        return ReplayWorkload(space, trace_path)
    raise ConfigError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
