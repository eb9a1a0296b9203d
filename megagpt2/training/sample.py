"""Print a generated sample at the end of training (the demo's last line)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..generation import SamplingConfig, generate
from ..parallel import ParallelState


def print_sample(model, tokenizer, prompt: str, ps: ParallelState, device: torch.device,
                 max_new_tokens: int = 60) -> None:
    """Data-parallel replica 0 samples (all its TP ranks together); rank 0 prints."""
    if ps.pp_size == 1 and ps.dp_rank == 0:
        ids = tokenizer.encode(prompt) or [tokenizer.eod]
        budget = min(max_new_tokens, model.cfg.n_positions - len(ids))
        cfg = SamplingConfig(max_new_tokens=max(budget, 1), temperature=0.8, top_k=40, seed=0)
        out = generate(model, [ids], cfg, pad_id=tokenizer.eod)[0]
        model.train()
        if ps.rank == 0:
            print(f"sample: {prompt}{tokenizer.decode(out)}", flush=True)
    if dist.is_initialized():
        dist.barrier()
