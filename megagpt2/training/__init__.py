"""Pretraining entry: parse the command line, plan the run (every check), then train on every rank.

Up to the plan nothing imports torch or starts a process group, so every mistake of the
config/launch kind ends within a second with one message, printed by the first rank only, and
exit code 2. Only then are the device, torch.distributed, the process groups and the trainer set up.
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
from .plan import RunPlan, plan_run
from .signals import Signals

if TYPE_CHECKING:
    import torch

USAGE_ERRORS = (ConfigError, DSConfigError, LaunchEnvError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Everything is checked before any process group exists; then every rank trains."""
    signals = Signals()  # first: a SIGTERM during start-up is kept, not fatal
    env: Optional[LaunchEnv] = None
    try:
        args, overrides = parse_args(argv)
        cfg = load_config(args.config, overrides)
        env = detect_env()
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
    import torch.distributed as dist

    from ..distributed import init_distributed
    from ..parallel import build_process_groups
    from .trainer import Trainer, describe

    timeout = plan.cfg.parallel.timeout_seconds
    init_distributed(env, device, timeout)
    groups = build_process_groups(plan.layout, timeout)
    trainer = Trainer(plan, groups, device, signals)
    if env.rank == 0:
        print(describe(plan, trainer.model.num_parameters()), flush=True)
    trainer.train()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
