"""A throw-away single-node Slurm cluster for tests: install, start, submit, stop.

The sbatch templates in ``scripts/slurm/`` are only worth something if a real Slurm runs them, so
the tests start one from Debian's packages (``slurmctld``, ``slurmd``, ``slurm-client``, ``munge``)
on this machine, as root, without systemd:

* every piece of state (munge key and socket, slurm.conf, spool, state, logs, pid files) lives in a
  private directory, so nothing in ``/etc`` or ``/run`` is used and two test runs cannot collide;
  ``SLURM_CONF`` points the client commands (and, through the job environment, ``srun`` inside a
  job) at our ``slurm.conf``;
* the three daemons run in the foreground as our children (``munged -F``, ``slurmctld -D``,
  ``slurmd -D``), so we know their PIDs and stop exactly those;
* ``proctrack/linuxproc`` + ``task/none`` keep Slurm away from cgroups (none are delegated here);
* ``MinJobAge=4`` matters for speed: ``sbatch --wait`` polls every 2 s while the finished job is
  still known to the controller, and backs off up to 32 s once it is not.

Facts learned on Slurm 22.05 (Debian 12): munged as root needs ``--force``; the directory holding
its socket must be world-executable; ``SlurmdSpoolDir`` must exist before slurmd starts; a job
asking for more tasks than CPUs stays pending forever unless it passes ``--overcommit``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.distributed_utils import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _apt_install(timeout: float) -> str | None:
    """apt-get install the Slurm packages; returns None on success, else why it failed."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=120", *PACKAGES]
    result = _run(install, timeout, env)
    if result.returncode != 0:
        # A fresh machine may have no package lists yet: update once, then try again.
        _run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=120"], timeout, env)
        result = _run(install, timeout, env)
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}"
    return None


def ensure_slurm(timeout: float = 300.0) -> str | None:
    """Make sure the Slurm and munge binaries exist; returns None if they do, else a skip reason.

    Installs with apt-get when they are missing. A temporary ``policy-rc.d`` that answers 101 keeps
    the packages' maintainer scripts from starting system-wide daemons (we start our own).
    """
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    added_policy = not POLICY_RC_D.exists()
    if added_policy:
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        reason = _apt_install(timeout)
    except subprocess.TimeoutExpired:
        reason = f"apt-get install did not finish within {timeout:.0f} s"
    finally:
        if added_policy:
            POLICY_RC_D.unlink()
    if reason is None and not all(shutil.which(b) for b in BINARIES):
        reason = f"apt-get succeeded but one of {BINARIES} is still missing"
    return reason


def _node_line() -> str:
    """The node description from ``slurmd -C`` (first line), reachable on loopback."""
    out = _run(["slurmd", "-C"], 30).stdout.splitlines()
    line = next(ln for ln in out if ln.startswith("NodeName="))
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


@dataclass
class SlurmCluster:
    """One controller + one compute node on this host; all state under ``root``.

    Use :meth:`start`, then :meth:`sbatch`; :meth:`stop` always (it is safe to call twice).
    """

    root: Path
    partition: str = "test"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands; sbatch exports it into the job (``--export=ALL``)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self, node_line: str, munge_socket: Path) -> None:
        host = node_line.split()[0].split("=", 1)[1]
        r = self.root
        (r / "etc" / "plugstack.conf").write_text("")
        self.conf.write_text("\n".join([
            "ClusterName=megaquant-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"PlugStackConfig={r / 'etc' / 'plugstack.conf'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MinJobAge=4",
            "MailProg=/bin/true",
            node_line,
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_munge(self) -> Path:
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o711)  # world-executable: clients must reach the socket inside
        mdir.chmod(0o711)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = mdir / "munge.socket"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--seed-file={mdir / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: sock.exists(), 20, "munged to create its socket")
        return sock

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what} (exited: {dead}); "
                                   f"logs in {self.root / 'log'}:\n{self.logs()}")
            time.sleep(0.2)

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        for d in ("etc", "state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._write_conf(_node_line(), self._start_munge())
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i"])
        self._spawn("slurmd", ["slurmd", "-D"])
        self._wait_for(self._node_idle, timeout, "the node to become idle")

    def _node_idle(self) -> bool:
        out = _run(["sinfo", "-h", "-o", "%T"], 10, self.env).stdout.split()
        return "idle" in out

    def sbatch(self, script: Path, args: list[str], sbatch_opts: list[str], env: dict,
               cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """``sbatch --wait`` a script, bounded by ``timeout`` seconds; returns sbatch's result.

        sbatch --wait exits with the job's exit code (1 if it died from a signal).
        """
        cmd = ["timeout", "-k", "5", str(timeout), "sbatch", "--wait",
               f"--partition={self.partition}", *sbatch_opts, str(script), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                              env={**self.env, **env}, timeout=timeout + 30)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def cancel_jobs(self) -> None:
        """Cancel every job of this (private) cluster, e.g. one whose ``sbatch --wait`` timed
        out."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            _run(["scancel", "--full", "--user=root"], 10, self.env)

    def stop(self) -> None:
        """Cancel jobs, then stop every process we started (by PID); idempotent."""
        self.cancel_jobs()
        self._kill_job_leftovers()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _kill_job_leftovers(self) -> None:
        """Kill job processes (slurmstepd and its tasks) still carrying our ``SLURM_CONF``.

        slurmstepd detaches from slurmd, so it is not our child; its environment (and that of the
        job's tasks) names our private slurm.conf, which identifies it exactly.
        """
        mine = str(self.conf)
        for proc in psutil.process_iter(["pid", "name"]):
            try:
                if proc.pid == os.getpid() or proc.environ().get("SLURM_CONF") != mine:
                    continue
                if proc.pid in {p.pid for p in self.procs.values()}:
                    continue
                proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
