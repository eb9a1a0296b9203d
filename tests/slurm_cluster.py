"""A real one-node Slurm cluster in a temporary directory, for tests of the sbatch scripts.

    with SlurmCluster(tmp_path / "slurm") as cluster:      # writes slurm.conf, starts the daemons
        job = cluster.sbatch(["launch/slurm/pretrain_gpt2.sbatch", "--config", "x.yaml"], cwd=repo)
        info = cluster.wait(job, timeout=180)             # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

Everything lives under one directory: slurm.conf, state, spool, logs, pid files. Clients reach this
cluster only through `cluster.env` (SLURM_CONF points at our slurm.conf), so a system Slurm, if any,
is never touched. Daemons run in the foreground as our children and are stopped by pid; nothing else
is signalled. CI runs them as root, as slurmd normally runs. Authentication is auth/none when the
plugin is installed (Slurm < 23.11), else a private munged with its own key and socket.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu/slurm-wlm",
    "/usr/lib/aarch64-linux-gnu/slurm-wlm",
    "/usr/lib64/slurm",
    "/usr/lib/slurm",
    "/usr/local/lib/slurm",
)


def _which(program: str) -> Optional[str]:
    """shutil.which, also looking in the sbin directories (the daemons live there; not every PATH has them)."""
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")


def missing_slurm() -> Optional[str]:
    """Why a cluster cannot start here (None when it can): the programs that are missing."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not _has_auth_none() and _which("munged") is None:
        missing.append("munged (this Slurm has no auth/none)")
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}); .ci/install_slurm.sh installs it"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_name() -> str:
    """This host's short name when it resolves (jobs use it as MASTER_ADDR), else localhost."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return "localhost"


def _has_auth_none() -> bool:
    dirs = list(PLUGIN_DIRS) + glob.glob("/usr/lib/*/slurm*")
    return any(Path(d, "auth_none.so").exists() for d in dirs)


class SlurmCluster:
    """slurmctld + slurmd (+ munged) for one node with `cpus` CPUs, state under `root`."""

    def __init__(self, root: Path, cpus: int = 8, auth: str = "auto"):
        self.root = Path(root)
        self.cpus = cpus
        self.auth = ("none" if _has_auth_none() else "munge") if auth == "auto" else auth
        self.node = _node_name()
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        # Jobs inherit the submitter's environment: drop any enclosing job's or launcher's variables.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in LAUNCHER_VARS
            and not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMIX_", "TORCHELASTIC_"))
        }
        self.env["SLURM_CONF"] = str(self.conf)

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        user = getpass.getuser()
        # cred_expire also delays the restart of a requeued job (default 120 s): keep it short here.
        info = ["cred_expire=10"] + ([f"socket={r}/run/munge.sock"] if self.auth == "munge" else [])
        auth = f"AuthType=auth/{self.auth}\nCredType=cred/{self.auth}\nAuthInfo={','.join(info)}\n"
        self.conf.write_text(f"""\
ClusterName=megagpt2test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
{auth}StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 60.0) -> None:
        self._write_conf()
        if self.auth == "munge":
            key = self.root / "run" / "munge.key"
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
            run = self.root / "run"
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "-F",
                    "-f",
                    f"--socket={run}/munge.sock",
                    f"--key-file={key}",
                    f"--pid-file={run}/munged.pid",
                    f"--log-file={self.root}/log/munged.log",
                    f"--seed-file={run}/munged.seed",
                ],
            )
            self._wait_for(lambda: (run / "munge.sock").exists(), timeout, "munged to create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait_for(
            lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle",
            timeout,
            "the node to become idle",
        )

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel our jobs, then stop the daemons we started (by pid): slurmd, slurmctld, munged."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.time() + 40
                while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)

    # -- clients ------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        env = dict(self.env, **kw.pop("env", {}))
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=check, **kw)

    def sbatch(self, args: list[str], cwd: Optional[Path] = None, env: Optional[dict] = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or {})
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: int, timeout: float = 180, states: frozenset = frozenset(FINISHED)) -> dict[str, str]:
        """Poll until the job reaches one of `states`; returns its last `job()` record."""
        deadline = time.time() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in states:
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)
