"""Benchmark workloads: routing decisions drawn step by step (markov, uniform, skewed) or replayed."""

from mer.routing import RoutingDecision, RoutingSpace
from mer.workloads.base import Workload, draw_distinct
from mer.workloads.factory import WORKLOAD_NAMES, make_workload
from mer.workloads.markov import MarkovWorkload
from mer.workloads.replay import ReplayWorkload, check_trace_fits
from mer.workloads.skewed import SkewedWorkload
from mer.workloads.uniform import UniformWorkload

__all__ = [
    "RoutingDecision", "RoutingSpace", "Workload", "draw_distinct", "WORKLOAD_NAMES", "make_workload",
    "MarkovWorkload", "ReplayWorkload", "check_trace_fits", "SkewedWorkload", "UniformWorkload",
]
