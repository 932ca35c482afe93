"""`mer-pipeline store info|verify DIR`: describe an expert store, or check every payload;
`mer-pipeline store shard --store FULL --out DIR --shard i/N`: copy one shard out of a store."""

from __future__ import annotations

import argparse
import json
import sys

from mer.cli.progress import ProgressDisplay
from mer.store.reader import ExpertStore
from mer.store.summary import format_summary, store_summary
from mer.store.verify import verify_store


def register(subparsers) -> None:
    parser = subparsers.add_parser("store", help="inspect an expert store (info, verify) or copy a shard out of it",
                                   description="Inspect an expert store directory.")
    actions = parser.add_subparsers(dest="store_action", metavar="ACTION", required=True)

    info = actions.add_parser("info", help="print geometry, dtypes, sizes, layout and source",
                              description="Print a store's geometry, dtypes per layer (grouped when "
                              "identical), sizes in bytes (payload per expert, slot, total), layout and source.")
    info.add_argument("directory", help="the store directory")
    info.add_argument("--json", action="store_true", help="print the same as one JSON object")
    info.set_defaults(handler=run_info)

    verify = actions.add_parser("verify", help="re-read every payload and check its checksum",
                                description="Re-read every expert payload and compare it with the "
                                "manifest's checksum. Exit status 1 if any expert is bad; each bad one "
                                "is named as 'layer L expert E (id G)'.")
    verify.add_argument("directory", help="the store directory")
    verify.add_argument("--json", action="store_true",
                        help='print {"ok": bool, "bad": [ids], "experts": n, "bytes": n} on stdout')
    verify.add_argument("--quiet", action="store_true", help="no progress on stderr")
    verify.set_defaults(handler=run_verify)

    shard = actions.add_parser("shard", help="copy one shard's experts out of a store (no GGUF needed)",
                               description="Write a shard store holding the experts that shard i of N holds "
                               "under the shard map (default: the uniform map), copying their payloads from "
                               "--store and checking each against the source's checksum.")
    shard.add_argument("--store", required=True, metavar="FULL", help="the source store (a whole store)")
    shard.add_argument("--out", required=True, metavar="DIR", help="the shard store to create (atomically)")
    shard.add_argument("--shard", required=True, metavar="i/N", help="shard i (0-based) of N")
    shard.add_argument("--shard-map", default=None, metavar="MAP.json",
                       help="the expert -> shard map (default: the uniform map of N shards)")
    shard.add_argument("--force", action="store_true", help="replace an existing store (or empty directory) at --out")
    shard.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    shard.add_argument("--quiet", action="store_true", help="no progress on stderr")
    shard.add_argument("--log-file", default=None, metavar="FILE",
                       help="append the JSON event store_shard_copied to FILE (without it, only warnings, to stderr)")
    shard.set_defaults(handler=run_shard)


def run_info(args: argparse.Namespace) -> int:
    summary = store_summary(ExpertStore.open(args.directory))
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    with ProgressDisplay("store verify", enabled=not args.quiet) as display:
        store = ExpertStore.open(args.directory)
        advance = display.start_phase("checking", store.manifest.total_payload_nbytes())
        report = verify_store(args.directory, advance)
    names = [store.manifest.describe(expert_id) for expert_id in report.bad]
    for name in names:
        print(f"store verify: checksum mismatch: {name}", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": report.ok, "bad": list(report.bad), "experts": report.num_experts,
                          "bytes": report.nbytes}))
    elif report.ok:
        print(f"{args.directory}: all {report.num_experts} experts ok ({report.nbytes:,} bytes checked)")
    else:
        print(f"{args.directory}: {len(names)} of {report.num_experts} experts bad: {'; '.join(names)}")
    return 0 if report.ok else 1


def run_shard(args: argparse.Namespace) -> int:
    from mer.cli.convert_command import describe
    from mer.store.shard_choice import parse_shard
    from mer.logging_setup import configure_logging
    from mer.store.shard_copy import copy_shard

    configure_logging("mer-store", log_file=args.log_file)
    shard = parse_shard(args.shard)
    with ProgressDisplay("store shard", enabled=not args.quiet) as display:
        result = copy_shard(args.store, args.out, shard, args.shard_map, force=args.force,
                            start_phase=display.start_phase)
    print(json.dumps(result.to_dict()) if args.json else describe(result).replace("converted", "copied", 1))
    return 0
