"""The global gradient norm where DeepSpeed does not keep one (ZeRO-0 fp32 clips and drops it)."""

from __future__ import annotations

import torch

from ..distributed import all_reduce_small
from ..parallel import ParallelState


def engine_keeps_no_norm(engine) -> bool:
    """True for DeepSpeed's ZeRO-0 fp32 path: it clips without keeping the norm, so the norm is
    computed here (before engine.step() clips) with the same counting rule."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


def grad_norm(model: torch.nn.Module, ps: ParallelState) -> float:
    """Global L2 norm of the gradients, each parameter counted once across TP x PP x DP.

    Parameters marked `model_parallel` are this rank's own (shards, and TP-replicated ones on
    tp_rank 0 only); gradients are identical across DP after the all-reduce."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and getattr(p, "model_parallel", True):
            sq += p.grad.detach().double().pow(2).sum().cpu()
    if ps.mp_group is not None:
        sq = all_reduce_small(sq, group=ps.mp_group)
    return float(sq.sqrt())
