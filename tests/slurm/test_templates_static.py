"""Checks on the Slurm templates and test harness that need no Slurm (always run, fast).

The QAT templates have no entry point to run yet, so parsing them with ``bash -n`` and checking
that they use the shared, fail-fast launcher is all that can be said about them for now.
"""

import subprocess
from pathlib import Path

import pytest

from tests.slurm import cluster as cluster_mod
from tests.slurm.cluster import ensure_slurm

TEMPLATES = Path(__file__).resolve().parents[2] / "scripts" / "slurm"


def test_ensure_slurm_gives_a_skip_reason_without_root(monkeypatch):
    """No binaries and no root: a reason to skip, not an install attempt nor a silent pass."""
    monkeypatch.setattr(cluster_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(cluster_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cluster_mod, "_apt_install", lambda timeout: pytest.fail("tried apt"))
    assert "root" in ensure_slurm()


@pytest.mark.parametrize("template", [f"{job}_{nodes}_node.sbatch" for job in ("ptq", "qat")
                                      for nodes in ("single", "multi")])
def test_template_is_valid_bash_with_fail_fast_launch(template):
    """Every template (QAT ones included, which no job runs yet) parses, runs its own entry
    point through launch.sh with the user's overrides, and logs per job id."""
    text = (TEMPLATES / template).read_text()
    subprocess.run(["bash", "-n", str(TEMPLATES / template)], check=True, timeout=10)
    assert f"ENTRY=${{ENTRY:-scripts/{template[:3]}.py}}" in text
    assert "scripts/slurm/launch.sh" in text and '"$ENTRY" "$@"' in text
    assert "#SBATCH --output=logs/%x-%j.out" in text


def test_launcher_is_valid_bash_and_kills_on_bad_exit():
    text = (TEMPLATES / "launch.sh").read_text()
    subprocess.run(["bash", "-n", str(TEMPLATES / "launch.sh")], check=True, timeout=10)
    assert "--kill-on-bad-exit=1" in text and "--max-restarts=0" in text
