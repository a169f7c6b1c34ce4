"""Write megaquant/integrations/bridge_contract.json from the Megatron-Bridge and NeMo wheels.

Reads each release's sources with ``ast`` (:mod:`megaquant.integrations.source`; nothing is
imported: Bridge needs TE and Python 3.12, NeMo 2 needs Lightning) and records the pre-wrap hook
signatures, the order of hook / Float16Module / DDP in ``get_model`` and of hook registration /
build / optimizer / checkpoint load in ``setup``, and NeMo's ``ModelTransform`` callback. Then it
checks every entry with :func:`megaquant.integrations.contract.bridge_violations` (and the NeMo
one) and exits 1 if a release breaks what megaquant relies on.

Add a release (docs/integrations.md)::

    python scripts/bridge_contract.py --download --wheels /tmp/bridge_wheels \
        --bridge 0.3.0 0.3.1 ... 0.7.0 --nemo 2.0.0 ... 2.7.3
    pytest tests/integrations

``--download`` fetches the missing wheels with ``pip download --no-deps --only-binary :all:
--python-version 3.12`` into ``--wheels`` (keep that folder out of the repo). 0.6.1 is left out
by default: it was yanked ("wrong version").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from megaquant.integrations.contract import FIXTURE, VIOLATIONS, release
from megaquant.integrations.source import read_bridge, read_nemo

BRIDGE = ["0.3.0", "0.3.1", "0.4.0", "0.4.1", "0.4.2", "0.5.0", "0.5.1", "0.6.0", "0.6.2"]
NEMO = ["2.0.0", "2.1.0", "2.2.1", "2.3.3", "2.4.1", "2.5.3", "2.6.2", "2.7.3"]  # newest per minor
WHEEL = {"megatron-bridge": "megatron_bridge-{v}-py3-none-any.whl",
         "nemo-toolkit": "nemo_toolkit-{v}-py3-none-any.whl"}
READ = {"megatron-bridge": read_bridge, "nemo-toolkit": read_nemo}


def wheel_path(wheels: Path, dist: str, version: str, fetch: bool) -> Path:
    path = wheels / WHEEL[dist].format(v=version)
    if not path.exists() and fetch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "--python-version", "3.12", f"{dist}=={version}", "-d",
                        str(wheels), "-q"], check=True)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass --download to fetch {dist}=={version}")
    return path


def build(wheels: Path, versions: dict[str, list[str]], fetch: bool) -> dict:
    out = {"generated_by": "scripts/bridge_contract.py"}
    for dist, vs in versions.items():
        releases = {}
        for v in sorted(vs, key=release):
            entry = READ[dist](wheel_path(wheels, dist, v, fetch))
            if entry["version"] != v:
                raise ValueError(f"{dist} wheel for {v} says it is {entry['version']}")
            releases[v] = entry
            print(f"read {dist} {v}")
        out[dist] = {"releases": releases}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder of the wheels")
    parser.add_argument("--download", action="store_true", help="fetch missing wheels first")
    parser.add_argument("--bridge", nargs="+", default=BRIDGE, metavar="VERSION")
    parser.add_argument("--nemo", nargs="+", default=NEMO, metavar="VERSION")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    args.wheels.mkdir(parents=True, exist_ok=True)
    fixture = build(args.wheels, {"megatron-bridge": args.bridge, "nemo-toolkit": args.nemo},
                    args.download)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}")
    problems = [p for dist in READ for e in fixture[dist]["releases"].values()
                for p in VIOLATIONS[dist](e)]
    for p in problems:
        print(f"CONTRACT BROKEN: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
