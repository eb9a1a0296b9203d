"""Build the tokenizer, the model for this rank, its optimizer and the DeepSpeed engine."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..config import Config
from ..model import GPT2
from ..parallel import ParallelState
from ..tokenizer import build_tokenizer
from .optim import build_optimizer, build_scheduler


def build_model(cfg: Config, ps: ParallelState):
    """(model, pipeline): the whole model and None at pp=1, else this stage and its schedule runner."""
    if ps.pp_size > 1:
        from ..pipeline import build_stage

        return build_stage(cfg, ps)
    return GPT2(cfg.model, ps, cfg.parallel.sequence_parallel, seed=cfg.train.seed), None


def build_engine(cfg: Config, ds: dict, ps: ParallelState, device: torch.device):
    """(engine, model, tokenizer, pipeline), with weights from train.init_from when set."""
    import deepspeed

    tokenizer = build_tokenizer(**asdict(cfg.tokenizer))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    model, pipeline = build_model(cfg, ps)
    if cfg.train.init_from:
        from ..checkpoint.reshard import load_pretrained

        load_pretrained(model, cfg.train.init_from)
        if pipeline is not None:
            pipeline.sync_tied_weight_from_first_stage(model)
    model.to(device)
    if cfg.model.compile:
        from ..model.compile import compile_model

        compile_model(model, cfg.model.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, mpu=ps, dist_init_required=False)
    if pipeline is not None:
        pipeline.attach(engine)
    return engine, model, tokenizer, pipeline
