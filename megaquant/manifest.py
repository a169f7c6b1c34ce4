"""SHA-256 manifests: every file megaquant writes is listed with its digest, and checked before use.

``manifest.json`` in a checkpoint or export directory::

    {"version": 1, "algorithm": "sha256",
     "files": {"__0_0.distcp": {"sha256": "9f2c...", "bytes": 232997}, ...}}

Paths are relative to the directory and use ``/``; the manifest does not list itself. Writing it
is the last step before a directory is renamed into place, so a complete directory always has
one. ``verify`` re-hashes the listed files and raises ``ManifestError`` naming the first file that
is missing, has another size or another digest (a truncated shard, bit rot, an edited file).

Why it matters: torch's DCP reader has no checksums -- 1000 flipped float bits in a ``.distcp``
load silently, a truncated one gives a bare ``EOFError``. A digest mismatch is caught before any
byte is interpreted. Directories written before manifests existed have none: ``verify`` then
returns ``False`` (callers warn) rather than refusing them.

Hashing is streamed (1 MiB reads); measured 153 MB/s on one core of the loaded 2-core dev box
(about 7 s per GB). Under several ranks, ``checkpoint.verify_checkpoint`` splits the files
(``files[rank::world]``) and gathers the verdicts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
VERSION = 1
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A file does not match its manifest entry (or the manifest itself is unreadable)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Regular files under ``directory`` (recursively, sorted), the manifest excluded."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | os.PathLike) -> dict:
    """Hash every file under ``directory`` and write ``manifest.json``; returns the manifest."""
    directory = Path(directory)
    files = {}
    for rel in _listed_files(directory):
        path = directory / rel
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"version": VERSION, "algorithm": "sha256", "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of ``directory``, or None when it has none (written before manifests)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert manifest.get("algorithm") == "sha256" and isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is damaged ({e}); the directory cannot be verified: "
                            "restore it or re-create the directory") from e
    return manifest


def check_files(directory: str | os.PathLike, manifest: dict, names: list[str]) -> list[str]:
    """Problems (one line each, naming the file) among ``names`` of the manifest; [] if none."""
    directory = Path(directory)
    problems = []
    for rel in names:
        entry, path = manifest["files"][rel], directory / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says "
                            f"{entry['bytes']} (truncated or replaced)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} does not match its SHA-256 in {MANIFEST} (corrupted or "
                            "modified)")
    return problems


def raise_problems(directory: str | os.PathLike, problems: list[str]) -> None:
    if problems:
        raise ManifestError(f"{directory} failed verification: {'; '.join(problems)}. Restore "
                            "the file, or re-create the checkpoint; do not use it as it is")


def verify(directory: str | os.PathLike) -> bool:
    """Check every file of the manifest (one process). True when verified, False when the
    directory has no manifest; raises ManifestError naming the file on any mismatch."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    raise_problems(directory, check_files(directory, manifest, sorted(manifest["files"])))
    return True
