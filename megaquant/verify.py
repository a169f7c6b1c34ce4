"""``megaquant verify DIR ...``: check checkpoints or exports against their ``manifest.json``.

Exit status 0 when every directory matches its manifest, 1 when one does not (the message
names the file) or has no manifest. Nothing is unpickled or loaded: only bytes are hashed.
"""

from __future__ import annotations

import argparse
import sys

from megaquant.manifest import ManifestError, verify


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megaquant verify", description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", metavar="DIR")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.directories:
        try:
            if verify(directory):
                print(f"OK {directory}")
            else:
                print(f"UNVERIFIED {directory}: no manifest.json (written before manifests)")
                status = 1
        except (ManifestError, OSError) as e:
            print(f"FAILED {e}", file=sys.stderr)
            status = 1
    return status
