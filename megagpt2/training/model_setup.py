"""Build the tokenizer, the model for this rank, its optimizer and the DeepSpeed engine."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..config import Config
from ..model import GPT2
from ..parallel import ParallelState
from ..tokenizer import build_tokenizer
from .optim import build_optimizer, build_scheduler


def build_model(cfg: Config, ps: ParallelState) -> GPT2:
    if ps.pp_size > 1:
        raise NotImplementedError("parallel.pp > 1 goes through megagpt2.pipeline")
    return GPT2(cfg.model, ps, cfg.parallel.sequence_parallel, seed=cfg.train.seed)


def build_engine(cfg: Config, ds: dict, ps: ParallelState, device: torch.device):
    """(engine, model, tokenizer), with weights from train.init_from when set."""
    import deepspeed

    tokenizer = build_tokenizer(**asdict(cfg.tokenizer))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    model = build_model(cfg, ps)
    if cfg.train.init_from:
        from .reshard import load_pretrained

        load_pretrained(model, cfg.train.init_from)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, mpu=ps, dist_init_required=False)
    return engine, model, tokenizer
