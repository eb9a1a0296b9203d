"""Autoregressive sampling with a KV cache, for batches of left-padded prompts.

Each row's prompt is right-aligned (left padding); padded key positions are masked out and
position ids count only real tokens, so a batched row produces exactly the tokens it would
produce alone. Works for any tp (every TP rank of a data-parallel replica runs the same loop with
the same seed and gets the same gathered logits); pipeline stages are not supported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .model import GPT2


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row (CTRL-style)
    stop_token: Optional[int] = None  # e.g. the end-of-document id
    seed: int = 0


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply repetition penalty (to tokens marked in the (B, V) bool `seen`), temperature,
    top-k and top-p to (B, V) logits; returns float32."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def pick(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Next token per row (B,) from filtered logits: argmax when greedy, else a draw."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids right-aligned, and the (B, T) bool mask of real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt cannot be continued)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        real[i, T - len(p):] = True
    return ids.to(device), real.to(device)


@torch.no_grad()
def generate(model: GPT2, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_id: int = 0,
             return_logits: bool = False):
    """Continue each prompt; returns the new tokens per row (stopping at stop_token, inclusive).

    With return_logits, also returns the (B, steps, V) logits used at each step.
    """
    model.eval()
    device = next(model.parameters()).device
    ids, real = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    if T + cfg.max_new_tokens > model.cfg.n_positions:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                         f"context of {model.cfg.n_positions} tokens")
    gen = torch.Generator().manual_seed(cfg.seed)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): pads share position 0
    keys_real = real.clone()  # (B, Tk) grows as tokens are added
    mask = ~keys_real[:, None, None, :] if not bool(real.all()) else None  # (B, 1, 1, Tk) True = masked
    logits, cache = model(ids, position_ids=positions, kv_cache=[None] * len(model.h), attn_mask=mask)
    out = torch.empty((B, 0), dtype=torch.long, device=device)
    all_logits, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1
    V = logits.shape[-1]
    seen = torch.zeros((B, V), dtype=torch.bool, device=device)
    rows_of = torch.arange(B, device=device)[:, None].expand(B, T)
    seen[rows_of[real], ids[real]] = True  # only real prompt tokens count as seen
    for _ in range(cfg.max_new_tokens):
        step_logits = logits[:, -1]
        if return_logits:
            all_logits.append(step_logits.float())
        tok = pick(filter_logits(step_logits, cfg, seen), cfg, gen)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        seen[torch.arange(B, device=device), tok] = True
        out = torch.cat([out, tok[:, None]], 1)
        if cfg.stop_token is not None:
            done |= tok == cfg.stop_token
        if bool(done.all()):
            break
        keys_real = torch.cat([keys_real, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
        mask = ~keys_real[:, None, None, :] if mask is not None else None
        logits, cache = model(tok[:, None], position_ids=next_pos[:, None], kv_cache=cache, attn_mask=mask)
        next_pos = next_pos + 1
    rows = []
    for r in out.tolist():
        if cfg.stop_token is not None and cfg.stop_token in r:
            r = r[: r.index(cfg.stop_token) + 1]
        rows.append(r)
    return (rows, torch.stack(all_logits, 1)) if return_logits else rows
