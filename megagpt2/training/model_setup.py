"""This rank's model, its optimizer and LR schedule, and the DeepSpeed engine around them.

AdamW decays only matrices (never biases, LayerNorm parameters); the learning rate warms up
linearly, then decays (cosine or linear) to optim.min_lr. DeepSpeed wraps the model and the
optimizer (ZeRO, precision, clipping); the step executor runs the schedule on the engine.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import torch
import torch.nn as nn

from ..config import OptimConfig
from ..model import GPT2
from ..parallel import ProcessGroups
from ..pipeline.executor import StepExecutor
from ..pipeline.stage import PipelineStage
from ..pipeline.tied import TiedEmbedding
from .plan import RunPlan


def build_model(plan: RunPlan, groups: ProcessGroups) -> Union[GPT2, PipelineStage]:
    """The whole GPT2 without pipelining, else this rank's PipelineStage of the planned split."""
    cfg = plan.cfg
    if plan.split is None:
        return GPT2(cfg.model, groups, cfg.parallel.sequence_parallel, seed=cfg.train.seed)
    return PipelineStage(cfg.model, groups, plan.split, cfg.parallel.sequence_parallel, seed=cfg.train.seed)


def build_engine(
    plan: RunPlan, groups: ProcessGroups, device: torch.device
) -> tuple[Any, Union[GPT2, PipelineStage], StepExecutor]:
    """(engine, model, step executor), with weights from train.init_from when set."""
    import deepspeed

    cfg = plan.cfg
    model = build_model(plan, groups)
    if cfg.train.init_from:
        from ..checkpoint.reshard import load_pretrained

        load_pretrained(model, cfg.train.init_from)
        TiedEmbedding(groups, model).broadcast_weight()  # the last stage's copy of wte (pipelines)
    model.to(device)
    if cfg.model.compile:
        from ..model.compile import compile_model

        compile_model(model, cfg.model.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ds = engine_ds_config(plan, device)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds,
        mpu=groups,
        lr_scheduler=scheduler,  # pyright: ignore[reportArgumentType]
        dist_init_required=False,
    )  # (DeepSpeed's hint names _LRScheduler only)
    return engine, model, StepExecutor(engine, model, groups, cfg.parallel, cfg.train.on_nonfinite)


def engine_ds_config(plan: RunPlan, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config the engine gets on `device` (batch sizes filled in, "auto" resolved)."""
    cuda = device.type == "cuda"
    return plan.ds.engine_config(cuda, cuda and torch.cuda.is_bf16_supported())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D weights (decayed) and biases / LayerNorm parameters (never decayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
    )


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at a step: linear warmup, then cosine/linear decay to min_lr."""
    decay_steps = cfg.decay_steps or total_steps
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay_style == "constant":
            return 1.0
        span = max(decay_steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if cfg.decay_style == "cosine" else 1.0 - t
        return floor + (1.0 - floor) * shape

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
