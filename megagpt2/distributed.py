"""Where am I in the job? One function reads every launcher's environment; one starts torch.distributed.

(Collectives over the groups of a run live in megagpt2.parallel; detection imports no torch.)

Sources, in order of precedence:
  1. torchrun / the deepspeed launcher / a script that exports them: RANK, WORLD_SIZE, LOCAL_RANK,
     MASTER_ADDR, MASTER_PORT
  2. OpenMPI mpirun: OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK (before Slurm:
     mpirun inside a Slurm allocation leaves the batch script's SLURM_* in every rank's environment)
  3. Slurm srun (one task per rank): SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS), SLURM_LOCALID,
     SLURM_STEP_NODELIST / SLURM_JOB_NODELIST (rank 0 runs on the first host)
  4. nothing: one process (when the caller allows it)

When RANK/WORLD_SIZE and a launcher's variables both describe one process per task (same world size,
no per-node launcher such as torchrun in between) they must agree; a disagreement is an error that
names the variables. So is a Slurm batch script that runs the program without srun.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Mapping, Optional

if TYPE_CHECKING:  # torch is imported where a device is picked, so launch checks stay light
    import torch


class LaunchEnvError(RuntimeError):
    """The environment does not describe a consistent distributed job."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "env" | "slurm" | "openmpi" | "single"

    def export(self) -> None:
        """Write the standard variables (what torch.distributed's env:// init reads)."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


# Variables that per-node launchers (torchrun's agent, deepspeed.launcher.launch) set for the ranks
# they start: under them, SLURM_PROCID / OMPI ranks count launchers, not training ranks.
PER_NODE_LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")
# Slurm's special step ids (batch script, extern, interactive salloc shell) are >= this.
_SLURM_SPECIAL_STEP = 0xFFFFFFF0
# Derived rendezvous ports stay below Linux's ephemeral range (32768+), where outgoing
# connections take their local ports.
PORT_BASE, PORT_SPAN = 15000, 16000

HostnameFn = Callable[[str], list]


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    if key not in env or env[key] == "":
        return None
    try:
        return int(env[key])
    except ValueError as e:
        raise LaunchEnvError(f"{key}={env[key]!r} is not an integer") from e


# -- Slurm host lists -----------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """'a[1,3],b' -> ['a[1,3]', 'b']: commas inside brackets do not separate hosts."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError("unbalanced or nested brackets")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError("unclosed bracket")
    return parts + [cur]


def _expand_ranges(spec: str) -> list[str]:
    """'003-005,7' -> ['003', '004', '005', '7'] (zero padding of the lower bound is kept)."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list the way `scontrol show hostnames` does.

    'gpu[003-005,007],rack[1-2]-n[01-02]' -> gpu003 gpu004 gpu005 gpu007 rack1-n01 rack1-n02 rack2-n01 rack2-n02
    """
    hosts: list[str] = []
    try:
        for item in _split_top_level(nodelist.strip()):
            if not item:
                raise ValueError("empty host name")
            pieces = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ..., text
            choices = [[p] if i % 2 == 0 else _expand_ranges(p) for i, p in enumerate(pieces)]
            hosts += ["".join(c) for c in itertools.product(*choices)]
    except ValueError as e:
        raise LaunchEnvError(f"cannot parse Slurm node list {nodelist!r}: {e}") from e
    return hosts


def slurm_hostnames(nodelist: str, timeout: float = 5.0) -> list[str]:
    """Host names of a Slurm node list: `scontrol show hostnames` when it answers, else our parser.

    The timeout matters: scontrol retries for a minute when it cannot find slurm.conf.
    """
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=timeout, check=True
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list ('gpu[003-005],cpu1' -> 'gpu003'), by our parser alone."""
    return expand_hostlist(nodelist)[0]


def port_for_job(job_id: str) -> int:
    """A rendezvous port every rank of one job derives alike (and neighbouring jobs differently)."""
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + key % PORT_SPAN


# -- one source each ------------------------------------------------------------------------------


def _is_srun_task(env: Mapping[str, str]) -> bool:
    step = _int(env, "SLURM_STEP_ID")
    if step is None:
        step = _int(env, "SLURM_STEPID")
    return step is not None and step < _SLURM_SPECIAL_STEP


def _slurm_world(env: Mapping[str, str]) -> Optional[int]:
    step_tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    return step_tasks if step_tasks is not None else _int(env, "SLURM_NTASKS")


def _check_agreement(env: Mapping[str, str], rank: int, world: int, local: Optional[int]) -> None:
    """RANK/WORLD_SIZE next to srun's or mpirun's own numbering: one process per task must agree."""
    launcher = [k for k in PER_NODE_LAUNCHER_VARS if k in env]
    if launcher:
        return  # torchrun or deepspeed's launcher started us: their numbering is the one to use
    candidates = []
    if _is_srun_task(env):
        candidates.append(
            (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                _int(env, "SLURM_PROCID"),
                _slurm_world(env),
                _int(env, "SLURM_LOCALID"),
            )
        )
    candidates.append(
        (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            _int(env, "OMPI_COMM_WORLD_RANK"),
            _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
        )
    )
    for r_name, w_name, l_name, r, w, lr in candidates:
        if r is None or w is None or w < world:
            continue  # w < world: a per-node launcher we do not know may have started several ranks per task
        if w > world:
            raise LaunchEnvError(
                f"WORLD_SIZE={world} but the launcher started {w} tasks ({w_name}); RANK/"
                f"WORLD_SIZE were probably exported to every task: unset RANK/WORLD_SIZE/"
                f"LOCAL_RANK and let megagpt2 read {r_name}"
            )
        if r != rank:
            raise LaunchEnvError(
                f"RANK={rank} disagrees with {r_name}={r} ({w_name}={w}); the same RANK was "
                f"probably exported to every task: unset RANK/WORLD_SIZE/LOCAL_RANK and let "
                f"megagpt2 read {r_name}"
            )
        if local is not None and lr is not None and lr != local:
            raise LaunchEnvError(f"LOCAL_RANK={local} disagrees with {l_name}={lr}; unset LOCAL_RANK")


def _from_torch_env(env: Mapping[str, str]) -> tuple:
    rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
    assert rank is not None and world is not None  # detect_env picks this source only when both are set
    _check_agreement(env, rank, world, local)
    return rank, world, local, env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")


def _from_slurm(env: Mapping[str, str], hostnames: HostnameFn) -> tuple:
    rank, world, local = _int(env, "SLURM_PROCID"), _slurm_world(env), _int(env, "SLURM_LOCALID")
    assert rank is not None and world is not None  # detect_env picks this source only when both are set
    if world > 1 and not _is_srun_task(env):
        raise LaunchEnvError(
            f"SLURM_NTASKS={world} but this process was not started by srun (no SLURM_STEP_ID: it is the "
            f"job's batch script or an salloc shell), so the other {world - 1} ranks would never come. "
            f"Start it with `srun python launch/pretrain_gpt2.py ...` (see launch/slurm/pretrain_gpt2.sbatch), "
            f"or give the job --ntasks=1 for one process"
        )
    addr = env.get("MASTER_ADDR")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not addr and nodes and world > 1:
        addr = hostnames(nodes)[0]  # srun's block distribution puts task 0 on the first host
    port = _int(env, "MASTER_PORT")
    if port is None and env.get("SLURM_JOB_ID"):
        port = port_for_job(env["SLURM_JOB_ID"])
    return rank, world, local, addr, port


def _from_openmpi(env: Mapping[str, str]) -> tuple:
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    one_node = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") == world
    # Set here rather than by mpi4py discovery, which picks a non-loopback address and needs mpi4py.
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else None)
    port = _int(env, "MASTER_PORT")
    job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or env.get("OMPI_MCA_orte_ess_jobid")
    if port is None:
        port = port_for_job(job) if job else 29500
    return rank, world, local, addr, port


def detect_env(
    env: Optional[Mapping[str, str]] = None, single_process_ok: bool = True, hostnames: HostnameFn = slurm_hostnames
) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from whichever launcher started us.

    env: the variables to read (default os.environ). single_process_ok: with no launcher variables at all,
    return one process on loopback (what `python launch/pretrain_gpt2.py` wants) instead of raising.
    hostnames: expands a Slurm node list (tests pass a pure function).
    """
    env = os.environ if env is None else env
    has = {
        name: _int(env, r) is not None and _int(env, w) is not None
        for name, r, w in (
            ("env", "RANK", "WORLD_SIZE"),
            ("slurm", "SLURM_PROCID", "SLURM_NTASKS"),
            ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        )
    }
    if (_int(env, "RANK") is None) != (_int(env, "WORLD_SIZE") is None):
        raise LaunchEnvError("only one of RANK and WORLD_SIZE is set; set both (or neither and use a launcher)")
    if has["env"]:
        source, (rank, world, local, addr, port) = "env", _from_torch_env(env)
    elif has["openmpi"]:
        source, (rank, world, local, addr, port) = "openmpi", _from_openmpi(env)
    elif has["slurm"]:
        source, (rank, world, local, addr, port) = "slurm", _from_slurm(env, hostnames)
    elif single_process_ok:
        return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")
    else:
        raise LaunchEnvError(
            "no launcher environment found (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS or "
            "OMPI_COMM_WORLD_RANK/SIZE); start with deepspeed, torchrun, srun or mpirun "
            "(see launch/README.md)"
        )
    return _checked(source, rank, world, local, addr, port)


def _checked(
    source: str, rank: int, world: int, local: Optional[int], addr: Optional[str], port: Optional[int]
) -> LaunchEnv:
    if world < 1 or not 0 <= rank < world:
        raise LaunchEnvError(f"{source}: rank {rank} is outside world size {world}")
    if local is None:
        local = rank if world == 1 else 0
    if local < 0 or local >= world:
        raise LaunchEnvError(f"{source}: local rank {local} is outside world size {world}")
    if world > 1 and not addr:
        raise LaunchEnvError(
            f"{source}: MASTER_ADDR is not set and cannot be derived; export MASTER_ADDR=<address "
            f"of the node running rank 0> (mpirun: launch/mpirun.sh does this)"
        )
    if world > 1 and not port:
        raise LaunchEnvError(f"{source}: MASTER_PORT is not set; export MASTER_PORT=<free port on rank 0's node>")
    if port is not None and not 0 < port < 65536:
        raise LaunchEnvError(f"{source}: MASTER_PORT={port} is not a TCP port")
    return LaunchEnv(rank, world, local, addr or "127.0.0.1", port or _free_port(), source)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is there (unless cpu was asked for), else cpu.

    When each task sees exactly one GPU (Slurm's --gpus-per-task=1 / --gpu-bind), that GPU is cuda:0.
    """
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
    if requested != "cpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        index = 0 if count == 1 else local_rank
        if index >= count:
            raise RuntimeError(
                f"local rank {local_rank} but only {count} GPUs visible on this node "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"start one rank per GPU"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


_started_here = False  # init_distributed started the running process group (so finish_distributed ends it)


def init_distributed(env: LaunchEnv, device: torch.device, timeout_seconds: float) -> None:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) through DeepSpeed's comm layer; a
    group that is already running (a caller's) is used as it is."""
    import deepspeed
    import torch.distributed as dist

    global _started_here
    env.export()
    if dist.is_initialized():
        return
    if device.type == "cpu":
        # DeepSpeed's shared-memory CPU allreduce is JIT-built (~30 s) at every start: not worth it here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timedelta(seconds=timeout_seconds),
        rank=env.rank,
        world_size=env.world_size,
    )
    _started_here = True


def finish_distributed() -> None:
    """End a successful run's torch.distributed, if init_distributed started it: every rank waits
    for the others, then the process groups are destroyed.

    Call it on the success path only (a rank that failed must not wait for the others). Leaving
    the groups to interpreter exit is not safe with gloo: a worker thread still releasing its last
    collective's tensors during finalisation cannot take the GIL and aborts the process
    ("terminate called without an active exception"): 11 of 40 two-rank runs that end on an
    all-gather, 0 of 40 with this call.
    """
    import torch.distributed as dist

    global _started_here
    if _started_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _started_here = False
