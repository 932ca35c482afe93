"""`mer-pipeline store info|verify DIR`: describe an expert store, or check every payload."""

from __future__ import annotations

import argparse
import json
import sys

from mer.cli.progress import ProgressDisplay
from mer.store.reader import ExpertStore
from mer.store.summary import format_summary, store_summary
from mer.store.verify import verify_store


def register(subparsers) -> None:
    parser = subparsers.add_parser("store", help="inspect an expert store (info, verify)",
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
