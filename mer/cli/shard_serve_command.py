"""`mer-pipeline shard-serve`: run the process graph as one shard group of a cluster (docs/scale-out.md).

The graph (router, I/O worker, predictor, compute workers) starts as `run` starts it, then its router
runs `ShardJob` (`mer.router.shard_job`): it binds `--bind` with CURVE (the shard key pair and the
admitted router public key from `--keys`) and answers `ShardLayerRequest`s for `--experts` until a
client sends `StopShardGroup` (exit 0, the `ShardSummary` printed) or the command gets SIGINT/SIGTERM
(the graph is brought down; exit 130/143).
"""

from __future__ import annotations

import argparse
import json
import sys

import uvloop

from mer.cli.flag_types import as_flag_type, non_negative_int
from mer.cli.pipeline_flags import add_config_flag, add_config_flags
from mer.cli.pipeline_job import _with_signals
from mer.cluster.keys import load_key_pair, load_public_key
from mer.config import config_overrides, load_config, validate_against_geometry
from mer.errors import ConfigError
from mer.logging_setup import configure_logging
from mer.protocol import StartShardGroup
from mer.router.shard_job import absent_experts, store_holding
from mer.runtime.supervisor import Supervisor
from mer.store.reader import ExpertStore

SHARD_JOB = "shard"  # no configuration key is specific to it: the keys every job reads get flags, and --store


def parse_expert_ids(text: str) -> list[int]:
    """`0-7,12,20-23` -> the ids, ascending; a bad part is a ConfigError naming it."""
    ids: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            start, stop = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"expert ids {text!r}: {part!r} is not an id or a range FIRST-LAST") from None
        if start < 0 or stop < start:
            raise ConfigError(f"expert ids {text!r}: {part!r} is not an id >= 0 or a range FIRST-LAST "
                              f"with FIRST <= LAST")
        ids.extend(range(start, stop + 1))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"expert ids {text!r} name an expert twice")
    return sorted(ids)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "shard-serve", help="serve this store's experts to a remote router as one shard group (CURVE over tcp)",
        description="Start the process graph on an expert store and serve its experts to a remote router: "
                    "bind a CURVE-secured tcp socket, admit only the router's public key, and answer each "
                    "ShardLayerRequest with the experts' outputs (f32 bit-identical to one machine). Ends on "
                    "a client's StopShardGroup (exit 0) or on SIGINT/SIGTERM.")
    parser.add_argument("--bind", required=True, metavar="tcp://HOST:PORT",
                        help="The endpoint to bind (port 0: a free one, logged in shard_group_listening).")
    parser.add_argument("--keys", required=True, metavar="DIR",
                        help="The key directory of `mer-pipeline keys`: shard.public, shard.secret, router.public.")
    parser.add_argument("--shard", type=non_negative_int, default=0, metavar="I",
                        help="This shard's index (named in its results and errors; default 0).")
    parser.add_argument("--experts", type=as_flag_type(parse_expert_ids), default=None, metavar="IDS",
                        help="The global expert ids served, e.g. 0-7,12 (default: every expert the store holds).")
    add_config_flag(parser, "store")  # a benchmark key that this job reads too
    add_config_flags(parser, job=SHARD_JOB, skip=("record_trace",))
    parser.add_argument("--json", action="store_true", help="Print the shard's summary as one JSON object.")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    configure_logging("mer-supervisor", log_file=args.log_file)
    config = load_config(args.config, config_overrides(args))
    if config.store is None:
        raise ConfigError("shard-serve needs an expert store: --store DIR (or store = ... in the config file)")
    start = StartShardGroup(bind=args.bind, key_dir=str(args.keys), shard=args.shard, experts=args.experts)
    load_key_pair(args.keys, "shard")  # a missing or bad key file fails here, before any process starts
    load_public_key(args.keys, "router")
    store = ExpertStore.open(config.store)
    validate_against_geometry(config, store.manifest.geometry)
    absent = [] if start.experts is None else absent_experts(start.experts, store.manifest)
    if absent:
        raise ConfigError(f"--experts {absent[:16]} are not in the store {config.store} "
                          f"({store_holding(store.manifest)})")
    summary = uvloop.run(_with_signals(Supervisor(config, store, job=start)))
    data = summary.to_json_dict()
    if args.json:
        print(json.dumps(data), flush=True)
    else:
        print(f"shard {data['shard']} at {data['endpoint']}: {data['requests']} requests answered "
              f"({data['rows']} rows, {data['expert_batches']} expert batches), {data['errors']} errors, "
              f"{data['seconds']:.1f} s", file=sys.stderr)
    return 0
