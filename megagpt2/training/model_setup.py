"""Build the tokenizer, the model for this rank, its optimizer and the DeepSpeed engine."""

from __future__ import annotations

import torch

from ..config import Config
from ..model import GPT2
from ..parallel import ParallelState
from .optim import build_optimizer, build_scheduler


def build_model(cfg: Config, ps: ParallelState):
    """(model, pipeline): the whole model and None at pp=1, else this stage and its schedule runner."""
    if ps.pp_size > 1:
        from ..pipeline import build_stage

        return build_stage(cfg, ps)
    return GPT2(cfg.model, ps, cfg.parallel.sequence_parallel, seed=cfg.train.seed), None


def resolve_run_tokenizer(cfg: Config, announce: bool = True):
    """The run's tokenizer (explicit, else the dataset's, else init_from's, else GPT-2 BPE), checked
    against the data, train.init_from and model.vocab_size; `cfg.tokenizer` becomes what it used,
    so checkpoints record the real tokenizer. One call, before anything is built from it."""
    from ..tokenizer.resolve import check_model_vocab, resolve_tokenizer

    resolved = resolve_tokenizer(cfg.tokenizer, cfg.data, cfg.train.init_from)
    check_model_vocab(resolved, cfg.model.vocab_size, cfg.train.init_from)
    cfg.tokenizer = resolved.config
    if announce:
        print(resolved.summary(), flush=True)
    return resolved.tokenizer


def build_engine(cfg: Config, ds: dict, ps: ParallelState, device: torch.device):
    """(engine, model, tokenizer, pipeline), with weights from train.init_from when set."""
    import deepspeed

    tokenizer = resolve_run_tokenizer(cfg, ps.rank == 0)
    model, pipeline = build_model(cfg, ps)
    if cfg.train.init_from:
        from ..checkpoint.reshard import load_pretrained

        load_pretrained(model, cfg.train.init_from)
        if pipeline is not None:
            pipeline.sync_tied_weight_from_first_stage(model)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, mpu=ps, dist_init_required=False)
    if pipeline is not None:
        pipeline.attach(engine)
    return engine, model, tokenizer, pipeline
