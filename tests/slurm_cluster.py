"""A real 2-node Slurm cluster on this machine, for the tests that submit launch/slurm/pretrain.sbatch.

Debian's ``slurm-wlm`` and ``munge`` (Slurm 22.05) are enough: ``munged`` with a fresh key, one
``slurmctld`` and two ``slurmd`` daemons (``-N reolm-n1``, ``-N reolm-n2``) on loopback ports,
all configured in a temporary folder (``slurm.conf``, state, spool, logs) and started as our own
child processes, so the fixture stops exactly what it started, by PID.  The node names are
added to /etc/hosts (127.0.0.1) when they do not resolve, because the job script's rendezvous
host is the first node's name.  Needs root (slurmd starts job steps as the submitting user).

``slurm_cluster`` (session scope) skips where Slurm is not installed, except under ``CI=true``
where a missing Slurm is a failure: CI installs it (.ci/run).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
NODES = ("reolm-n1", "reolm-n2")
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # reolm test Slurm cluster\n"


def _find(name: str) -> str | None:
    return shutil.which(name) or next((p for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                       if os.access(p := f"{d}/{name}", os.X_OK)), None)


def missing_reason() -> str | None:
    """Why a local cluster cannot run here, or None."""
    absent = [name for name in DAEMONS if _find(name) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts job steps as the submitting user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _resolves(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


class LocalSlurm:
    """Start/stop the daemons and talk to the cluster (``run``, ``submit``, ``job``, ``wait``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.added_hosts = False
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "log", *[f"spool-{n}" for n in NODES]):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._hosts()
        self.conf.write_text(self._config())
        socket_path = self.root / "munge" / "socket"
        self._spawn("munged", [_find("munged"), "-F", "-f", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={self.root / 'munge' / 'pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'seed'}"])
        self._until(socket_path.exists, timeout, "munged socket")
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_find("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self._until(self._nodes_idle, timeout, "both nodes idle in sinfo")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([_find("scancel"), "--user", "root"], env=self.env, capture_output=True)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", check=False).strip():
                time.sleep(0.5)
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.added_hosts:
            hosts = Path("/etc/hosts")
            hosts.write_text(hosts.read_text().replace(HOSTS_LINE, ""))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited: {self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"local Slurm: no {what} after {timeout} s: {self.logs()}")

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def _hosts(self) -> None:
        if all(_resolves(n) for n in NODES):
            return
        with open("/etc/hosts", "a") as f:
            f.write(HOSTS_LINE)
        self.added_hosts = True

    def _config(self) -> str:
        r = self.root
        ctld, (p1, p2) = _free_port(), (_free_port(), _free_port())
        host = socket.gethostname()
        # A random first job id: jobs of concurrent sessions get different rendezvous ports.
        first_job = random.randrange(1000, 30000)
        return "\n".join([
            "ClusterName=reolmtest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'socket'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
            "MpiDefault=none", "ReturnToService=2", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            # KillWait: SIGTERM -> SIGKILL on scontrol requeue / cancel; the ranks checkpoint within it.
            "KillWait=60", "MinJobAge=3600", "InactiveLimit=0", "MessageTimeout=20", f"FirstJobId={first_job}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            f"NodeName={NODES[0]} NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=2 RealMemory=8000",
            f"NodeName={NODES[1]} NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=2 RealMemory=8000",
            f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ using it
    def run(self, cmd: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([_find(cmd), *args], env={**self.env, **(env or {})}, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def submit(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        proc = subprocess.run([_find("sbatch"), "--parsable", *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, states: tuple[str, ...], timeout: float, release: bool = False) -> dict[str, str]:
        """Poll until the job is in one of ``states``; ``release`` starts a requeued job at once
        (Slurm holds a requeued job for two minutes before it is eligible again)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        held_since = None
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            held = info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
            held_since = (held_since or time.time()) if held else None
            # Not at once: until the nodes have cleaned up the previous run, slurmd refuses the
            # restart ("Job credential revoked") and the job fails.
            if release and held and time.time() - held_since > 5 and self._nodes_idle():
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {info}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
