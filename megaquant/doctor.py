"""``megaquant doctor``: what this machine runs, and whether megaquant fits its Megatron and TE.

Run it first after upgrading megatron-core or Transformer Engine. It prints the versions of
torch, megatron-core, Transformer Engine and hydra-core; then whether the installed megatron-core
(or a tree given with ``--megatron-src DIR``) has every symbol and signature megaquant uses
(:mod:`megaquant.megatron.contract`, read with ``ast``); then for each TE autograd function
megaquant patches the operand positions it resolved *by name*:

* from the live functions when TE imports here (GPU machines);
* from a TE source tree with ``--te-src DIR`` (an unzipped ``transformer-engine`` wheel or a
  checkout), read with ``ast`` and never imported (CPU machines, CI).

Exit status: 0 when Megatron fits and every TE function resolved (or TE is absent and not
required); 1 when Megatron lacks something megaquant uses (named per symbol), when a TE
function did not resolve (the error names the TE version, function, missing name and names
found) or when TE is installed but fails to import; 2 for usage errors. ``--json`` prints one
JSON object instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from typing import Any

from megaquant.megatron import contract
from megaquant.te.signatures import FunctionSignature, TESignatureError, resolve
from megaquant.te.source import read_tree
from megaquant.te.targets import TARGETS

PACKAGES = {
    "torch": ("torch",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch"),
    "hydra-core": ("hydra-core",),
}


def installed_versions() -> dict[str, str | None]:
    """Distribution versions from package metadata (nothing is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for label, dists in PACKAGES.items():
        out[label] = None
        for dist in dists:
            try:
                out[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def _from_source(root: str) -> dict[str, Any]:
    """Resolve every target from a TE tree read with ast."""
    tree = read_tree(root)
    report: dict[str, Any] = {"source": f"ast:{root}", "version": tree["version"], "functions": {}}
    for target in TARGETS:
        entry = tree["functions"].get(target.function)
        if entry is None:
            raise TESignatureError(
                f"TE {tree['version']}: {target.source_path} not found under {root}"
            )
        sig = FunctionSignature(tuple(entry["params"]), entry["var_positional"])
        resolved = resolve(target, sig, tree["version"]).describe()
        resolved["call_sites"] = [
            {"caller": s["caller"], "mode": s["mode"], "bound": s["bound"]}
            for s in entry["call_sites"]
        ]
        report["functions"][target.function] = resolved
    return report


def _from_live() -> dict[str, Any]:
    """Resolve every target from the TE imported in this process."""
    from megaquant.te.live import resolve_live, te_version

    functions = {t.function: resolve_live(t).describe() for t in TARGETS}
    return {"source": "live", "version": te_version(), "functions": functions}


def _megatron(src: str | None, version: str | None) -> tuple[dict[str, Any], list[str]]:
    """The Megatron contract checked against ``src`` or the installed tree."""
    root = src or contract.installed_tree()
    if root is None:
        return {"source": None}, ["megatron-core is not installed (pip install megaquant)"]
    from packaging.specifiers import SpecifierSet

    label = f"ast:{src}" if src else f"installed {version}"
    found = contract.problems(contract.read_release(root), src or version)
    if not src and version and version not in SpecifierSet(contract.SUPPORTED):
        found.insert(0, f"megatron-core {version} is outside the supported range "
                        f"{contract.SUPPORTED} (tests/fixtures/megatron_api.json)")
    return {"source": label, "supported": contract.SUPPORTED, "symbols": len(contract.CONTRACT),
            "problems": found}, found


def collect(te_src: str | None, require_te: bool,
            megatron_src: str | None = None) -> dict[str, Any]:
    """The whole report as a dict; ``errors`` lists what makes the exit status non-zero."""
    report: dict[str, Any] = {"versions": installed_versions(), "te": [], "errors": []}
    report["megatron"], errors = _megatron(megatron_src, report["versions"]["megatron-core"])
    report["errors"] += errors
    sources = [("ast", te_src)] if te_src else []
    if importlib.util.find_spec("transformer_engine") is not None:
        sources.append(("live", None))
    elif require_te and not te_src:
        report["errors"].append(
            "transformer_engine is not installed (--require-te); install it on a CUDA machine "
            "or pass --te-src DIR to check a TE source tree"
        )
    for kind, root in sources:
        try:
            report["te"].append(_from_source(root) if kind == "ast" else _from_live())
        except TESignatureError as e:
            report["errors"].append(str(e))
        except Exception as e:  # noqa: BLE001 - a broken TE import is the diagnosis itself
            report["errors"].append(f"{kind} TE check failed: {type(e).__name__}: {e}")
    add_integrations(report)
    return report


def add_integrations(report: dict[str, Any]) -> None:
    """Megatron-Bridge / NeMo: installed versions and whether megaquant's hook contract holds."""
    from megaquant.integrations.contract import installed_report  # noqa: PLC0415

    integ = installed_report()
    report["integrations"] = integ["frameworks"]
    report["errors"] += integ["errors"]


def format_integrations(report: dict[str, Any]) -> list[str]:
    lines = []
    for dist, info in report.get("integrations", {}).items():
        if info["version"] is None:
            state = "absent"
        else:
            state = f"{info['version']}, contract {'holds' if info.get('holds') else 'BROKEN'}"
        lines.append(f"{dist}: {state} (recorded {info['contract']})")
    return lines


def format_text(report: dict[str, Any]) -> str:
    lines = ["versions:"]
    for name, version in report["versions"].items():
        lines.append(f"  {name:20s} {version or 'absent'}")
    mc = report.get("megatron", {})
    if mc.get("source"):
        state = "fits" if not mc["problems"] else f"{len(mc['problems'])} problem(s)"
        lines.append(f"megatron-core ({mc['source']}): {state} ({mc['symbols']} symbols checked, "
                     f"supported {mc['supported']})")
    if not report["te"] and not report["errors"]:
        lines.append("transformer-engine: absent (nothing to patch; pass --te-src DIR to check "
                     "a tree)")
    for te in report["te"]:
        lines.append(f"TE {te['version']} ({te['source']}):")
        for fn, info in te["functions"].items():
            ops = ", ".join(f"{k}@{v}" for k, v in info["operands"].items())
            extra = ", ".join(f"{k}@{v}" for k, v in info["optional"].items())
            var = f", *args@{info['varargs_start']}" if info["varargs_start"] is not None else ""
            lines.append(f"  {fn}.forward: {ops}{var}" + (f" (also {extra})" if extra else ""))
    lines += format_integrations(report)
    for err in report["errors"]:
        lines.append(f"ERROR: {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="megaquant doctor",
        description="Print versions and the TE operand positions megaquant resolves by name.",
    )
    parser.add_argument("--te-src", metavar="DIR",
                        help="TE source tree (unzipped transformer-engine wheel) read with ast")
    parser.add_argument("--megatron-src", metavar="DIR",
                        help="directory holding a megatron/ package (an unzipped "
                             "megatron-core wheel) to check instead of the installed one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--require-te", action="store_true",
                        help="fail when TE is not installed (and no --te-src is given)")
    args = parser.parse_args(argv)
    report = collect(args.te_src, args.require_te, args.megatron_src)
    report["ok"] = not report["errors"]
    print(json.dumps(report, indent=1) if args.json else format_text(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
