"""`mer-pipeline keys --out DIR`: make the CURVE key pairs of a cluster (the router's and the shard
groups'), as z85 files (`mer.cluster.keys`, docs/scale-out.md)."""

from __future__ import annotations

import argparse
import sys

from mer.cluster.keys import write_key_files


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "keys", help="make the CURVE key pairs of a cluster (router and shard groups)",
        description="Make a CURVE key pair for the router (client) and one for the shard groups (server), "
        "written as z85 files: router.public, router.secret, shard.public, shard.secret (secret files mode "
        "0600, public 0644). Existing key files are refused unless --force.")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the key files into "
                        "(created if missing)")
    parser.add_argument("--force", action="store_true", help="replace key files that already exist")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    written = write_key_files(args.out, force=args.force)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    print("shard groups need shard.secret, shard.public and router.public; "
          "the router needs router.secret, router.public and shard.public", file=sys.stderr)
    return 0
