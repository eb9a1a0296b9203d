"""Pretraining entry: parse the command line, plan the run (every check), then train on every rank.

Up to the plan nothing imports torch or starts a process group, so every mistake of the
config/launch kind ends within a second with one message, printed by the first rank only, and
exit code 2. Only then are the device, torch.distributed, the process groups and the trainer set up.
Rank 0 takes the checkpoint directory's lock (megagpt2.training.lock) before torch.distributed starts;
when another run holds it, every rank exits 2 together and nothing is written. Exit codes: 0 (done, or
stopped cleanly by SIGTERM/SIGUSR1/a vanished launcher), 130 (stopped by Ctrl-C), 2 (refused), 1 (failed).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING, Optional, Sequence

from ..config import ConfigError, load_config
from ..distributed import LaunchEnv, LaunchEnvError, detect_env
from ..ds_config import DSConfigError
from .cli import parse_args
from .lock import LockError, RunLock
from .plan import RunPlan, plan_run
from .signals import Signals

if TYPE_CHECKING:
    import torch

USAGE_ERRORS = (ConfigError, DSConfigError, LaunchEnvError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Everything is checked before any process group exists; then every rank trains."""
    signals = Signals()  # first: a SIGTERM or Ctrl-C during start-up is kept, not fatal
    env: Optional[LaunchEnv] = None
    try:
        args, overrides = parse_args(argv)
        cfg = load_config(args.config, overrides)
        env = detect_env()
        signals.first_rank = env.rank == 0
        plan = plan_run(cfg, args.deepspeed_config, env.world_size, env.rank)
    except USAGE_ERRORS as e:
        return _refuse(e, env)
    try:
        device = _device(plan, env)
    except USAGE_ERRORS as e:
        return _refuse(e, env)
    try:
        _quiet_libraries()
        return _train(plan, env, device, signals)
    except BaseException:
        # A failing rank must end the job: print, then exit hard without waiting on collectives.
        print(f"[rank {env.rank}] training failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def _refuse(error: Exception, env: Optional[LaunchEnv]) -> int:
    """Exit code 2; the message once per job (every rank finds the same mistake)."""
    if _first_rank(env):
        print(f"error: {error}", file=sys.stderr, flush=True)
    return 2


def _first_rank(env: Optional[LaunchEnv]) -> bool:
    if env is not None:
        return env.rank == 0
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):  # the launch environment itself is broken
        if os.environ.get(var, "0") != "0":
            return False
    return True


def _device(plan: RunPlan, env: LaunchEnv) -> torch.device:
    """This rank's device, and the DeepSpeed precision rule for it (still before any process group)."""
    from ..distributed import pick_device

    try:
        device = pick_device(plan.cfg.train.device, env.local_rank)
    except RuntimeError as e:  # train.device=cuda without CUDA, more ranks than GPUs
        raise LaunchEnvError(str(e)) from None
    plan.ds.check_device(device.type == "cuda")
    return device


def _quiet_libraries() -> None:
    """DeepSpeed logs every engine detail at INFO on every rank; keep warnings and errors."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated.*")


def _train(plan: RunPlan, env: LaunchEnv, device: torch.device, signals: Signals) -> int:
    from ..distributed import finish_distributed, init_distributed
    from ..parallel import build_process_groups
    from .trainer import Trainer, describe

    timeout = plan.cfg.parallel.timeout_seconds
    lock, refusal = _lock_checkpoint_dir(plan, env)
    try:
        init_distributed(env, device, timeout)
        if _any_rank(refusal is not None):  # every rank learns rank 0's outcome and exits 2 with it
            if refusal is not None:
                print(f"error: {refusal}", file=sys.stderr, flush=True)
            finish_distributed()  # every rank agreed to stop
            return 2
        if lock is not None:
            signals.on_exit_now.append(lock.release)
            if lock.took_over:
                print(f"megagpt2: {lock.took_over}", flush=True)
        groups = build_process_groups(plan.layout, timeout)
        trainer = Trainer(plan, groups, device, signals)
        if env.rank == 0:
            print(describe(plan, trainer.model.num_parameters()), flush=True)
        result = trainer.train()
        finish_distributed()  # every rank has written its part of the last checkpoint
        return signals.exit_code(result["stop_code"])
    finally:
        if lock is not None:
            lock.release()


def _lock_checkpoint_dir(plan: RunPlan, env: LaunchEnv) -> tuple[Optional[RunLock], Optional[LockError]]:
    """Rank 0 (which writes the directory's shared files) takes checkpoint.dir's lock before anything
    is written there; (None, None) on the other ranks and when nothing is saved."""
    if env.rank != 0 or not plan.cfg.checkpoint.dir:
        return None, None
    try:
        return RunLock.acquire(plan.cfg.checkpoint.dir), None
    except LockError as e:  # held by another run, or not writable
        return None, e


def _any_rank(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    from ..parallel.collectives import all_reduce_small

    return bool(all_reduce_small(torch.tensor([float(flag)]), op=dist.ReduceOp.MAX).item())
