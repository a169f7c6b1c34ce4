"""The sbatch templates in ``scripts/slurm/``, submitted to a real (throw-away) Slurm.

A module-scoped fixture installs Slurm from Debian's packages if needed, starts one controller and
one node on this machine (see ``cluster.py``), and stops every daemon it started afterwards. Each
test submits a template with ``sbatch --wait`` (bounded by ``timeout``) and checks the job's exit
code and what it wrote. The templates ask for GPUs, a partition and an account; on this CPU-only
node the tests override those on the sbatch command line (which wins over ``#SBATCH`` lines), so
the templates themselves run unmodified.

Without root, apt or package access the whole module is skipped with the reason, never passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, ensure_slurm

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "scripts" / "slurm"
DIST_JOB = "tests/slurm/dist_job.py"
# one job; a healthy one takes 20-50 s on 2 cores, far more when they are oversubscribed
JOB_TIMEOUT_S = 420

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_slurm()
    if reason is not None:
        pytest.skip(f"no Slurm for the template tests: {reason}")
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def submit(cluster: SlurmCluster, template: str, tmp_path: Path, overrides: list[str],
           tasks_per_node: int, cpus_per_task: int, env: dict | None = None):
    """Submit ``template`` on the test partition; returns (exit code, seconds, log, out dir)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out_dir = tmp_path / "out"
    opts = [
        "--gpus-per-node=0", "--account=test", "--nodes=1", "--time=5",
        f"--ntasks-per-node={tasks_per_node}", f"--cpus-per-task={cpus_per_task}",
        f"--output={tmp_path}/%x-%j.out",
    ]
    # Without a .venv in the repo the templates run `python` from PATH: make that ours.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    job_env = {"OUT_DIR": str(out_dir), "OMP_NUM_THREADS": "1", "PATH": path, **(env or {})}
    start = time.monotonic()
    result = cluster.sbatch(TEMPLATES / template, overrides, opts, job_env, cwd=REPO,
                            timeout=JOB_TIMEOUT_S)
    elapsed = time.monotonic() - start
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))
    if result.returncode == 124:
        cluster.cancel_jobs()  # or the next test's job would queue behind this one
        pytest.fail(f"job did not finish within {JOB_TIMEOUT_S} s\n{logs}\n{cluster.logs()}")
    return result.returncode, elapsed, f"{result.stderr}\n{logs}", out_dir


def read_summary(out_dir: Path, logs: str) -> dict:
    path = out_dir / "summary.json"
    assert path.exists(), f"the job wrote no {path}; its log:\n{logs}"
    return json.loads(path.read_text())


PTQ_OVERRIDES = ["+recipe=nvfp4", "model=tiny", "data.calib_samples=4", "data.eval_samples=4"]


def test_ptq_single_node_srun_two_tasks_matches_single_process(cluster, tmp_path):
    """The PTQ template as a user submits it: 2 ranks (data parallel), Hydra overrides passed
    straight through. Reference: the same PTQ in one plain process; the DP-averaged losses must
    agree (same seed, same weights; only the reduction order differs)."""
    assert (REPO / "scripts" / "ptq.py").exists(), "scripts/ptq.py is not in the tree yet"
    rc, _, logs, out_dir = submit(cluster, "ptq_single_node.sbatch", tmp_path / "job",
                                  PTQ_OVERRIDES, tasks_per_node=2, cpus_per_task=1)
    assert rc == 0, logs
    summary = read_summary(out_dir, logs)
    assert summary["world_size"] == 2, summary
    assert summary["recipe"] == "nvfp4", summary
    assert summary["parallel"]["dp"] == 2, summary
    assert (out_dir / "checkpoint").is_dir(), "the 2-rank job saved no checkpoint"

    ref_dir = tmp_path / "ref"
    ref = subprocess.run(
        [sys.executable, "scripts/ptq.py", *PTQ_OVERRIDES, f"run.output_dir={ref_dir}",
         "run.save_checkpoint=false"],
        cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((ref_dir / "summary.json").read_text())
    assert expected["world_size"] == 1
    for key in ("loss_fp", "loss_quant"):
        assert summary["eval"][key] == pytest.approx(expected["eval"][key], rel=1e-4), key


def check_all_reduce(summary: dict, world_size: int) -> None:
    """Sum of rank+1 over ranks is n(n+1)/2 exactly (small integers in float32)."""
    assert summary["world_size"] == world_size
    assert summary["sum"] == world_size * (world_size + 1) / 2
    assert [r["rank"] for r in summary["ranks"]] == list(range(world_size))
    assert sorted(r["local_rank"] for r in summary["ranks"]) == list(range(world_size))


def test_single_node_template_srun_one_task_per_rank(cluster, tmp_path):
    rc, _, logs, out_dir = submit(cluster, "ptq_single_node.sbatch", tmp_path, [],
                                  tasks_per_node=2, cpus_per_task=1, env={"ENTRY": DIST_JOB})
    assert rc == 0, logs
    summary = read_summary(out_dir, logs)
    check_all_reduce(summary, 2)
    # srun mode: each rank is its own Slurm task, and its rank is SLURM_PROCID.
    assert [r["slurm_procid"] for r in summary["ranks"]] == ["0", "1"]


def test_multi_node_template_torchrun_per_node(cluster, tmp_path):
    rc, _, logs, out_dir = submit(cluster, "ptq_multi_node.sbatch", tmp_path, [],
                                  tasks_per_node=1, cpus_per_task=2,
                                  env={"ENTRY": DIST_JOB, "NPROC_PER_NODE": "2"})
    assert rc == 0, logs
    summary = read_summary(out_dir, logs)
    check_all_reduce(summary, 2)
    # torchrun mode: both workers live in Slurm task 0, so torchrun's RANK must have won.
    assert [r["slurm_procid"] for r in summary["ranks"]] == ["0", "0"]


@pytest.mark.parametrize("template,tasks,cpus,env", [
    ("ptq_single_node.sbatch", 2, 1, {}),
    ("ptq_multi_node.sbatch", 1, 2, {"NPROC_PER_NODE": "2"}),
])
def test_failed_rank_fails_job_without_waiting_for_timeout(cluster, tmp_path, template, tasks,
                                                           cpus, env):
    """Rank 1 exits 3 at start-up while rank 0 waits for it in init_process_group with a 300 s
    timeout: the launcher (srun --kill-on-bad-exit, torchrun's agent) must end the job non-zero
    long before that timeout and before this test's own bound."""
    rc, elapsed, logs, out_dir = submit(cluster, template, tmp_path,
                                        ["fail_rank=1", "run.timeout_s=300"], tasks, cpus,
                                        env={"ENTRY": DIST_JOB, **env})
    assert rc != 0, logs
    assert elapsed < 120, f"job took {elapsed:.0f} s to fail\n{logs}"
    assert "failing on purpose" in logs
    assert not (out_dir / "summary.json").exists()


def test_hung_rank_fails_job_after_collective_timeout(cluster, tmp_path):
    """Rank 1 sleeps for an hour; rank 0's all_reduce times out after run.timeout_s=5, rank 0
    exits non-zero, and srun kills the sleeper: the job fails in seconds, not at --time."""
    rc, elapsed, logs, _ = submit(cluster, "ptq_single_node.sbatch", tmp_path,
                                  ["hang_rank=1", "run.timeout_s=5"], tasks_per_node=2,
                                  cpus_per_task=1, env={"ENTRY": DIST_JOB})
    assert rc != 0, logs
    assert elapsed < 120, f"job took {elapsed:.0f} s to fail\n{logs}"
    assert "Timed out" in logs, logs


@pytest.mark.slow
def test_hydra_submitit_sweep_one_job_per_recipe(cluster, tmp_path):
    """The documented sweep path: ``--multirun hydra/launcher=submitit_slurm`` over two recipes
    submits one 2-task Slurm job each; each must produce its recipe's summary at world size 2."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed")
    recipes = ["nvfp4", "fp8"]
    cmd = [sys.executable, "scripts/ptq.py", "--multirun", "hydra/launcher=submitit_slurm",
           f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.nodes=1",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"run.output_dir={tmp_path}/out/${{recipe.name}}", "run.save_checkpoint=false",
           f"+recipe={','.join(recipes)}", *PTQ_OVERRIDES[1:]]
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), *sys.path])),
           "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=2 * JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        cluster.cancel_jobs()
        pytest.fail(f"the sweep did not finish within {2 * JOB_TIMEOUT_S} s")
    assert result.returncode == 0, result.stderr[-3000:]
    for recipe in recipes:
        summary = read_summary(tmp_path / "out" / recipe, result.stderr[-3000:])
        assert summary["recipe"] == recipe and summary["world_size"] == 2, summary
