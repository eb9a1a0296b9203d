"""Print a generated sample at the end of training (the demo's last line)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..generation import SamplingConfig, generate
from ..parallel import ParallelState


def print_sample(model, tokenizer, prompt: str, ps: ParallelState, device: torch.device,
                 max_new_tokens: int = 60) -> None:
    """Data-parallel replica 0 samples (all its TP ranks together); rank 0 prints.

    The sample stops at the end of a document, never contains the unknown or document-start
    token and is printed without special tokens (readable Chinese with a BERT vocabulary)."""
    if ps.pp_size == 1 and ps.dp_rank == 0:
        ids = tokenizer.encode(prompt)
        start = tokenizer.bos if tokenizer.bos is not None else tokenizer.eod
        if not ids or (tokenizer.bos is not None and ids[0] != tokenizer.bos):
            ids = [start] + ids  # as documents start in the data
        budget = min(max_new_tokens, model.cfg.n_positions - len(ids))
        banned = tuple(t for t in (tokenizer.unk, tokenizer.bos) if t is not None and t != tokenizer.eod)
        cfg = SamplingConfig(max_new_tokens=max(budget, 1), temperature=0.8, top_k=40, seed=0,
                             stop_token=tokenizer.eod, banned_tokens=banned)
        out = generate(model, [ids], cfg, pad_id=tokenizer.eod)[0]
        model.train()
        if ps.rank == 0:
            print(f"sample: {prompt}{tokenizer.decode(out, skip_special_tokens=True)}", flush=True)
    if dist.is_initialized():
        dist.barrier()
