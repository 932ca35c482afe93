"""Benchmark workloads: routing decisions drawn step by step (markov, uniform, skewed) or replayed."""

from mer.routing.space import RoutingDecision, RoutingSpace
from mer.routing.workloads.base import Workload, draw_distinct
from mer.routing.workloads.factory import WORKLOAD_NAMES, make_workload
from mer.routing.workloads.markov import MarkovWorkload
from mer.routing.workloads.replay import ReplayWorkload, check_trace_fits
from mer.routing.workloads.skewed import SkewedWorkload
from mer.routing.workloads.uniform import UniformWorkload

__all__ = [
    "RoutingDecision", "RoutingSpace", "Workload", "draw_distinct", "WORKLOAD_NAMES", "make_workload",
    "MarkovWorkload", "ReplayWorkload", "check_trace_fits", "SkewedWorkload", "UniformWorkload",
]
