#!/usr/bin/env python3
"""Write the held-out text shipped with mer (`mer/models/tiny-moe-held-out.txt`): the text that
`mer-pipeline perplexity` scores the embedded model on when no --file is given (docs/tiny-model.md).

It is six whole files of the Python standard library that the tiny model's training held out
(`tools/tiny_moe_data.is_held_out`: crc32 of the relative path = 0 mod 20), concatenated in the order
of `FILES`, byte for byte: the model never saw them, and like its training data they come from the
Python standard library, distributed under the PSF License Agreement (PSF-2.0), which permits
redistribution. The shipped copy was written from CPython 3.11.7's standard library:

    python tools/write_held_out_text.py mer/models/tiny-moe-held-out.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_data import is_held_out, stdlib_root  # noqa: E402

FILES = ("copy.py", "glob.py", "sched.py", "modulefinder.py", "site.py", "symtable.py")  # held out, ~80 KB


def held_out_text(root: Path) -> bytes:
    """The files of `FILES` under `root`, concatenated; each is checked to be held out."""
    for name in FILES:
        if not is_held_out(name):
            raise SystemExit(f"{name} is not held out from the tiny model's training (crc32 % 20 != 0)")
    return b"".join((root / name).read_bytes() for name in FILES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the text")
    parser.add_argument("--stdlib", type=Path, default=None, help="the standard library (default: this Python's)")
    args = parser.parse_args()
    data = held_out_text(args.stdlib or stdlib_root())
    args.out.write_bytes(data)
    print(f"{args.out}: {len(data)} bytes from {', '.join(FILES)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
