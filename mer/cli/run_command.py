"""`mer-pipeline run`: the expert-streaming benchmark through the real process graph."""

from __future__ import annotations

import argparse

from mer.cli.cluster_flags import add_cluster_flags, cluster_options
from mer.cli.cluster_launch import run_with_cluster
from mer.cli.pipeline_flags import add_config_flags
from mer.cli.pipeline_job import run_pipeline_job
from mer.config import BENCHMARK, config_overrides, load_config
from mer.errors import ConfigError
from mer.logging_setup import configure_logging
from mer.protocol import StartBenchmark
from mer.store.reader import ExpertStore


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the expert-streaming benchmark through the process graph",
        description=(
            "Start the process graph (router, I/O worker, predictor, compute workers) on an expert store "
            "and run the seed's expert-streaming benchmark; print the seed-format summary."
        ),
    )
    add_config_flags(parser, job=BENCHMARK)
    add_cluster_flags(parser)
    parser.add_argument("--json", action="store_true",
                        help="Print the run summary as one JSON object on stdout (nothing else on stdout).")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cluster = cluster_options(args)
    config = load_config(args.config, config_overrides(args))
    if config.store is None:
        raise ConfigError("run needs an expert store: --store DIR (or store = ... in the config file)")
    if cluster is not None:
        ExpertStore.open(config.store)  # a bad store fails before the cluster comes up
        configure_logging("mer-supervisor", log_file=config.log_file)  # the bring-up's events: never on stdout
    return run_with_cluster(cluster, config.store, config, lambda remote_shards: run_pipeline_job(
        config, as_json=args.json, job=StartBenchmark(remote_shards)), "run")
