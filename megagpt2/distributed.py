"""Where am I in the job? One function reads every launcher's environment; one starts torch.distributed.

Sources, in order of precedence:
  1. torchrun / the deepspeed launcher / our sbatch: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
  2. Slurm srun (one task per rank): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST
  3. OpenMPI mpirun: OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
When a launcher's variables and RANK/WORLD_SIZE are both present and describe one rank per task,
they must agree; anything inconsistent is an error that says which variables disagree.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch


class LaunchEnvError(RuntimeError):
    """The environment does not describe a consistent distributed job."""


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "env" | "slurm" | "openmpi" | "single"

    def export(self) -> None:
        """Write the standard variables (what torch.distributed's env:// init reads)."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    if key not in env or env[key] == "":
        return None
    try:
        return int(env[key])
    except ValueError as e:
        raise LaunchEnvError(f"{key}={env[key]!r} is not an integer") from e


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list such as 'gpu[003-005,007],cpu1' -> 'gpu003'."""
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchEnvError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _port_for_job(env: Mapping[str, str]) -> int:
    job = _int(env, "SLURM_JOB_ID") or 0
    return 20000 + job % 20000  # the same on every node of the job, rarely taken


def detect_env(env: Optional[Mapping[str, str]] = None, single_process_ok: bool = True) -> LaunchEnv:
    """Read rank, world size, local rank and rendezvous address from the launcher's variables."""
    env = os.environ if env is None else env
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    s_rank, s_world, s_local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
    o_rank, o_world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    o_local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    if (rank is None) != (world is None):
        raise LaunchEnvError("only one of RANK and WORLD_SIZE is set; set both (or neither and use a launcher)")
    if rank is not None:
        for name, r, w in (("SLURM_PROCID/SLURM_NTASKS", s_rank, s_world),
                           ("OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE", o_rank, o_world)):
            if r is not None and w == world and r != rank:  # one rank per task: must agree
                raise LaunchEnvError(f"RANK={rank} disagrees with {name}={r}/{w}; unset RANK/WORLD_SIZE "
                                     f"or launch one task per rank")
        local = _int(env, "LOCAL_RANK")
        addr, port, source = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT"), "env"
    elif s_rank is not None and s_world is not None:
        rank, world, local, source = s_rank, s_world, s_local or 0, "slurm"
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else None)
        port = _int(env, "MASTER_PORT") or _port_for_job(env)
    elif o_rank is not None and o_world is not None:
        rank, world, local, source = o_rank, o_world, o_local or 0, "openmpi"
        one_node = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") == o_world
        # mpi4py-based discovery would pick a non-loopback address; on one node use loopback.
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else None)
        port = _int(env, "MASTER_PORT") or 29500
    else:
        if not single_process_ok:
            raise LaunchEnvError("no launcher environment found (RANK/WORLD_SIZE, SLURM_* or OMPI_COMM_WORLD_*); "
                                 "start with deepspeed, torchrun, srun or mpirun")
        return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")
    if world < 1 or not 0 <= rank < world:
        raise LaunchEnvError(f"rank {rank} is outside world size {world}")
    if local is None:
        local = rank if world == 1 else 0
    if world > 1 and not addr:
        raise LaunchEnvError(f"{source}: MASTER_ADDR is not set and cannot be derived; export MASTER_ADDR "
                             f"(the first node's address)")
    if world > 1 and not port:
        raise LaunchEnvError(f"{source}: MASTER_PORT is not set; export MASTER_PORT")
    return LaunchEnv(rank, world, local, addr or "127.0.0.1", port or _free_port(), source)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is there (unless cpu was asked for), else cpu."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
    if requested != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs on this node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(env: LaunchEnv, device: torch.device, timeout_seconds: float) -> None:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) through DeepSpeed's comm layer."""
    import deepspeed
    import torch.distributed as dist

    env.export()
    if dist.is_initialized():
        return
    if device.type == "cpu":
        # DeepSpeed's shared-memory CPU allreduce is JIT-built (~30 s) at every start: not worth it here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_seconds), rank=env.rank,
                               world_size=env.world_size)


def all_reduce_small(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """All-reduce a small tensor wherever the backend needs it (GPU for NCCL), return it on CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else t.device
    x = t.to(dev)
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x.cpu()
