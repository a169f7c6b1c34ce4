"""Write tests/fixtures/megatron_api.json: what each megatron-core release declares for the
symbols megaquant uses (megaquant/megatron/contract.py), read with ``ast`` from the wheels.

    pip download --no-deps --only-binary :all: --python-version 3.12 megatron-core==0.16.1 \\
        -d /tmp/mcore          # one per release; older ones: --python-version 3.11
    python scripts/megatron_api.py --wheels /tmp/mcore
    pytest tests/megatron/test_megatron_contract.py

Nothing is imported or installed: the wheels are unzipped into a temporary folder and read.
After adding a release, set ``SUPPORTED`` in the contract and megatron-core's range in
pyproject.toml from what the test reports.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import zipfile
from pathlib import Path

from megaquant.megatron.contract import CONTRACT, read_release

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "megatron_api.json"
WHEEL_RE = re.compile(r"megatron_core-([^-]+)-.*\.whl$")


def trim(release: dict) -> dict:
    """Full parameter lists for the methods megaquant overrides (exact uses); for the rest only
    the parameters megaquant passes that the release has (TransformerConfig has ~300 fields)."""
    out = {}
    for use in CONTRACT:
        have = release[use.path]
        if have is not None and use.params is not None and not use.exact:
            have = [p for p in have if p in use.params]
        out[use.path] = have
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", required=True, help="folder of megatron_core-*.whl files")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    releases = {}
    for wheel in sorted(Path(args.wheels).glob("megatron_core-*.whl")):
        version = WHEEL_RE.search(wheel.name).group(1)
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("megatron/")])
            releases[version] = trim(read_release(tmp))
        print(f"{version}: {sum(v is None for v in releases[version].values())} symbols absent")
    key = lambda v: tuple(int(x) for x in re.findall(r"\d+", v))  # noqa: E731
    out = {"source": "megatron-core wheels read with ast (scripts/megatron_api.py)",
           "releases": {v: releases[v] for v in sorted(releases, key=key)}}
    # One line per symbol: small diffs when a release is added.
    text = json.dumps(out, indent=1)
    text = re.sub(r"\[\n\s*([^\[\]]*?)\n\s*\]",
                  lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
