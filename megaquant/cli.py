"""The ``megaquant`` console command: a dispatcher over subcommands.

    megaquant doctor [--te-src DIR] [--json] [--require-te]
    megaquant verify DIR [DIR ...]

Each subcommand is a module with ``main(argv) -> int``; this file only routes to it, so a
subcommand's imports (torch, megatron) are paid only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "doctor": ("megaquant.doctor", "versions and TE operand positions; run after upgrading TE"),
    "verify": ("megaquant.verify", "check a checkpoint or export against its SHA-256 manifest"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="megaquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage (or --help) and exits 2 / 0
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
