"""Pretraining entry: parse the command line, check everything, start the ranks' training."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional

from ..config import ConfigError, load_config, validate
from .ds_config import DSConfigError, read_ds_config, resolve_batch

USAGE = """deepspeed launch/pretrain_gpt2.py --deepspeed_config configs/ds/zero2.json \\
        --config configs/gpt2/tiny.yaml [--section.key=value ...]"""


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="pretrain_gpt2.py", usage=USAGE,
                                description="Pretrain GPT-2 with tensor, pipeline and ZeRO data parallelism.",
                                epilog="Any config field can be overridden: --train.steps=100 --parallel.tp=2")
    p.add_argument("--config", default=None, help="YAML config (configs/gpt2/<preset>.yaml)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default="configs/ds/zero2.json", help="DeepSpeed JSON (batch sizes, ZeRO, precision)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):  # accept --a.b=c and --a.b c
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            p.error(f"unrecognised argument {item!r}; overrides look like --section.key=value")
        if "=" not in item:
            if i + 1 >= len(rest):
                p.error(f"override {item} needs a value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


def main(argv: Optional[list[str]] = None) -> int:
    """Everything is checked before any process group exists; then every rank trains."""
    from ..distributed import LaunchEnvError, detect_env, init_distributed, pick_device

    from .signals import Signals

    signals = Signals()  # first: a SIGTERM during start-up is kept, not fatal
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        env = detect_env()
        validate(cfg, env.world_size)
        ds_raw = read_ds_config(args.deepspeed_config)
        _, accum, _ = resolve_batch(ds_raw, env.world_size // (cfg.parallel.tp * cfg.parallel.pp),
                                    args.deepspeed_config)
        if cfg.parallel.pp > 1:
            from ..pipeline import check_layout

            check_layout(cfg.parallel.schedule, cfg.parallel.pp, cfg.parallel.virtual_stages, accum)
    except (ConfigError, DSConfigError, LaunchEnvError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        device = pick_device(cfg.train.device, env.local_rank)
        _quiet_libraries()
        init_distributed(env, device, cfg.parallel.timeout_seconds)
        return _train(cfg, ds_raw, device, signals)
    except BaseException:
        # A failing rank must end the job: print, then exit hard without waiting on collectives.
        print(f"[rank {env.rank}] training failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def _quiet_libraries() -> None:
    """DeepSpeed logs every engine detail at INFO on every rank; keep warnings and errors."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated.*")


def _train(cfg, ds_raw: dict, device, signals) -> int:
    import torch.distributed as dist

    from ..parallel import ParallelState
    from .ds_config import resolve_ds_config
    from .trainer import Trainer, describe

    ps = ParallelState(cfg.parallel.tp, cfg.parallel.pp, timeout_seconds=cfg.parallel.timeout_seconds)
    ds = resolve_ds_config(ds_raw, ps.dp_size, device)
    trainer = Trainer(cfg, ds, ps, device, signals)
    if ps.rank == 0:
        print(describe(cfg, ds, ps, trainer.model.num_parameters()), flush=True)
    trainer.train()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
