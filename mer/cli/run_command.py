"""`mer-pipeline run`: the expert-streaming benchmark through the real process graph."""

from __future__ import annotations

import argparse

from mer.cli.pipeline_flags import add_pipeline_flags, parse_worker_count
from mer.cli.pipeline_job import run_pipeline_job
from mer.config import config_overrides, load_config
from mer.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the expert-streaming benchmark through the process graph",
        description=(
            "Start the process graph (router, I/O worker, predictor, compute workers) on an expert store "
            "and run the seed's expert-streaming benchmark; print the seed-format summary."
        ),
    )
    parser.add_argument("--store", type=str, metavar="DIR", default=None, help="Expert store directory.")
    add_pipeline_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    args.compute_workers = parse_worker_count(args.compute_workers)
    config = load_config(args.config, config_overrides(args))
    if config.store is None:
        raise ConfigError("run needs an expert store: --store DIR (or store = ... in the config file)")
    return run_pipeline_job(config, as_json=args.json)
