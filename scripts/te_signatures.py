"""Write tests/fixtures/te_signatures.json: TE's autograd-function signatures for every release.

Reads the Python sources inside each ``transformer-engine`` py3-none-any wheel with ``ast``
(never imports them: TE's extension needs CUDA, and installing TE beside megatron-core breaks
``import megatron.core``). For each release and each function megaquant patches it records the
``forward`` signature, whether it returns a tuple, and every call site (apply vs forward, the
ctx placeholder, the argument expressions bound to each parameter name).

Add a new TE release (see docs/te.md)::

    python scripts/te_signatures.py --download --wheels /tmp/te_wheels
    pytest tests/te

``--download`` asks ``pip index versions transformer-engine`` for the releases and fetches the
missing wheels with ``pip download --no-deps --only-binary :all:`` into ``--wheels`` (keep that
folder out of the repo). Meta wheels without sources (1.9.0) are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.version import Version

from megaquant.te.source import read_tree

FIRST_RELEASE = Version("1.9.0.post1")  # first wheel that carries GroupedLinear's source
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "te_signatures.json"
WHEEL_RE = re.compile(r"transformer_engine-([^-]+)-py3-none-any\.whl$")


def list_releases() -> list[str]:
    """Releases on the index, oldest first, from FIRST_RELEASE on."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformer-engine"],
        check=True, capture_output=True, text=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Available versions:"))
    versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
    return sorted((v for v in versions if Version(v) >= FIRST_RELEASE), key=Version)


def download(versions: list[str], wheels: Path) -> None:
    """Fetch the wheels not already in ``wheels``."""
    have = {m.group(1) for p in wheels.glob("*.whl") if (m := WHEEL_RE.search(p.name))}
    for v in versions:
        if v in have:
            continue
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             f"transformer-engine=={v}", "-d", str(wheels), "-q"],
            check=True,
        )


def read_wheel(path: Path) -> dict | None:
    """The fixture entry for one wheel, or None for a meta wheel without sources."""
    with zipfile.ZipFile(path) as zf, tempfile.TemporaryDirectory() as tmp:
        wanted = [
            n for n in zf.namelist()
            if n.startswith("transformer_engine/pytorch/module/")
            or n.endswith(".dist-info/METADATA")
        ]
        if not any(n.endswith("module/linear.py") for n in wanted):
            return None
        zf.extractall(tmp, members=wanted)
        return read_tree(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder of TE wheels")
    parser.add_argument("--download", action="store_true", help="fetch missing releases first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.wheels.mkdir(parents=True, exist_ok=True)
    if args.download:
        download(list_releases(), args.wheels)
    entries = {}
    for path in sorted(args.wheels.glob("*.whl")):
        m = WHEEL_RE.search(path.name)
        if m is None or Version(m.group(1)) < FIRST_RELEASE:
            continue
        entry = read_wheel(path)
        if entry is None:
            print(f"skip {path.name}: no Python sources (meta wheel)")
            continue
        entries[entry["version"]] = entry["functions"]
        print(f"read {entry['version']}: {', '.join(entry['functions'])}")
    ordered = {v: entries[v] for v in sorted(entries, key=Version)}
    fixture = {"generated_by": "scripts/te_signatures.py", "versions": ordered}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1, sort_keys=False) + "\n")
    print(f"wrote {len(ordered)} releases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
