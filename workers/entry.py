"""Spawn target of every child of the graph: picks the role's class and runs it."""

from __future__ import annotations

from mer.runtime.child import run_child


def _role_factory(role: str):
    if role == "io":
        from workers.io_worker import IoWorker as factory
    elif role == "predictor":
        from workers.predictor import Predictor as factory
    elif role == "compute":
        from workers.compute_worker import ComputeWorker as factory
    elif role == "router":
        from workers.router import Router as factory
    else:
        raise ValueError(f"unknown role {role!r}")
    return factory


def main(role: str, index: int | None, name: str, run_json: str) -> None:
    run_child(_role_factory(role), role, index, name, run_json)
