"""The Megatron-Bridge / NeMo contract: which releases were read, and what megaquant needs of them.

``bridge_contract.json`` beside this file is written by ``scripts/bridge_contract.py`` from the
released wheels (read with ``ast`` by :mod:`.source`): one entry per release with the hook
signatures and the order of hook / Float16Module / DDP in ``get_model`` and of hook
registration / model build / optimizer / checkpoint load in ``setup``. :func:`violations` says,
for one entry, which of the facts megaquant's hook relies on do not hold; the tests run it over
every recorded release and ``megaquant doctor`` over the installed one. :func:`check_release`
refuses an installed release outside the recorded range, naming it.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).with_name("bridge_contract.json")
DISTS = ("megatron-bridge", "nemo-toolkit")
REMEDY = {
    "megatron-bridge": "run scripts/bridge_contract.py with the new wheel and check the "
                       "diff, or pass check_version=False to attach at your own risk",
    "nemo-toolkit": "nemo.collections.llm (NeMo 2) ships up to nemo-toolkit 2.7.x and is gone "
                    "in 3.0: use Megatron-Bridge (megaquant.integrations.bridge) instead",
}


@lru_cache(maxsize=1)
def load_contract() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def release(version: str) -> tuple[int, ...]:
    """``"0.6.2"`` -> ``(0, 6, 2)``; pre-release and local suffixes are ignored."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def recorded_range(dist: str) -> tuple[str, str]:
    versions = sorted(load_contract()[dist]["releases"], key=release)
    return versions[0], versions[-1]


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_root(dist: str) -> Path:
    """The site-packages directory an installed distribution's files live under."""
    return Path(importlib.metadata.distribution(dist).locate_file(""))


def check_release(dist: str, version: str | None = None) -> str | None:
    """The installed (or given) version of ``dist`` if the contract covers it; None if absent.

    Covered means between the oldest and newest release recorded in the fixture (inclusive).
    """
    version = version if version is not None else installed_version(dist)
    if version is None:
        return None
    low, high = recorded_range(dist)
    if not release(low) <= release(version) <= release(high):
        raise RuntimeError(
            f"{dist} {version} is outside megaquant's contract ({dist} {low} .. {high}, read "
            f"from the released wheels into {FIXTURE.name}); {REMEDY[dist]}")
    return version


def _before(order: list[str], *events: str) -> bool:
    return all(e in order for e in events) and [order.index(e) for e in events] == sorted(
        order.index(e) for e in events)


def bridge_violations(entry: dict[str, Any]) -> list[str]:
    """What megaquant's pre-wrap hook relies on and this Bridge release does not provide."""
    v, sig, out = entry.get("version"), entry["signatures"], []
    if (sig.get("ModelProviderMixin.register_pre_wrap_hook") or [])[:3] != ["self", "hook",
                                                                           "prepend=False"]:
        out.append(f"{v}: register_pre_wrap_hook(hook, prepend=False) not found "
                   f"({sig.get('ModelProviderMixin.register_pre_wrap_hook')})")
    if not _before(entry["get_model_order"], "build", "pre_wrap_hook", "float16_module", "ddp"):
        out.append(f"{v}: get_model no longer runs build -> pre-wrap hook -> Float16Module -> DDP "
                   f"(read {entry['get_model_order']})")
    if not _before(entry["setup_order"], "register_hooks", "build_model", "optimizer",
                   "checkpoint_load"):
        out.append(f"{v}: setup no longer runs hook registration -> build -> optimizer -> "
                   f"checkpoint load (read {entry['setup_order']})")
    if (sig.get("pretrain") or [])[:2] != ["config", "forward_step_func"]:
        out.append(f"{v}: pretrain(config, forward_step_func) not found ({sig.get('pretrain')})")
    if (sig.get("save_megatron_model") or [])[:2] != ["model", "path"]:
        out.append(f"{v}: save_megatron_model(model, path) not found")
    quant = sig.get("AutoBridge.export_hf_weights_quant")
    if release(v or "0") >= (0, 5) and (quant or [])[1:5] != [
            "model", "quantization_checker", "quant_fn", "quant_block_size=None"]:
        out.append(f"{v}: AutoBridge.export_hf_weights_quant(model, quantization_checker, "
                   f"quant_fn, quant_block_size=None) not found ({quant})")
    return out


def nemo_violations(entry: dict[str, Any]) -> list[str]:
    """What the NeMo ModelTransform adapter relies on and this nemo-toolkit does not provide."""
    v, out = entry.get("version"), []
    if not entry["has_llm_collection"]:
        out.append(f"{v}: nemo.collections.llm is absent (NeMo 2 LLM collection)")
    if not entry["apply_transform_calls_model_transform"]:
        out.append(f"{v}: ModelTransform.apply_transform no longer calls "
                   "self.model_transform(trainer.model)")
    return out


VIOLATIONS = {"megatron-bridge": bridge_violations, "nemo-toolkit": nemo_violations}


def installed_report() -> dict[str, Any]:
    """For ``megaquant doctor``: each installed framework's version and whether the contract holds.

    The installed sources are read with ``ast`` (as the fixture was), never imported: a broken
    TE would otherwise stop the report. ``errors`` lists what makes doctor exit non-zero.
    """
    from megaquant.integrations.source import read_bridge, read_nemo

    readers = {"megatron-bridge": read_bridge, "nemo-toolkit": read_nemo}
    report: dict[str, Any] = {"frameworks": {}, "errors": []}
    for dist in DISTS:
        version = installed_version(dist)
        entry: dict[str, Any] = {"version": version, "contract": " .. ".join(recorded_range(dist))}
        report["frameworks"][dist] = entry
        if version is None:
            continue
        try:
            check_release(dist, version)
            root = source_root(dist)
            entry["violations"] = VIOLATIONS[dist](readers[dist](root))
            report["errors"] += entry["violations"]
        except (RuntimeError, FileNotFoundError, SyntaxError) as e:
            entry["violations"] = [str(e)]
            report["errors"].append(str(e))
        entry["holds"] = not entry["violations"]
    return report
