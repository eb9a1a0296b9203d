"""Autoregressive sampling with a KV cache, for batches of left-padded prompts.

Each row's prompt is right-aligned (left padding); padded key positions are masked out and
position ids count only real tokens, so a batched row produces exactly the tokens it would
produce alone. Each row draws from its own random generator (seeded `cfg.seed + row` unless
`seeds` are given), so sampled rows do not depend on what else is in the batch either.

`use_cache=False` recomputes the whole sequence at every step: the reference the cached path is
tested against (same tokens, logits within 1e-5).

Works for any tp: every TP rank of a replica runs the same loop with the same seeds and gets
the same gathered logits, so all ranks pick the same tokens. Pipeline stages are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union, overload

import torch

from .model import GPT2

StopFn = Callable[[int, list[int]], bool]  # (row, tokens generated so far) -> stop this row now


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row (CTRL-style)
    stop_token: Optional[int] = None  # e.g. the end-of-document id; kept in the output
    seed: int = 0
    banned_tokens: tuple[int, ...] = ()  # never sampled, e.g. [UNK] (as GPT2-Chinese and chitchat do)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(t < 0 for t in self.banned_tokens):
            raise ValueError(f"banned_tokens must be token ids >= 0, got {self.banned_tokens}")


def never_generated(tokenizer, allow_unk: bool = False, stop_at_eod: bool = True) -> tuple[int, ...]:
    """Special ids a model should not sample: the unknown token (unless ``allow_unk``), the padding
    token, and the document-start token while generation stops at the end of the document (it can
    only follow the end-of-document token). The end-of-document token itself is never among them."""
    specials = [tokenizer.pad, None if allow_unk else tokenizer.unk, tokenizer.bos if stop_at_eod else None]
    return tuple(sorted({t for t in specials if t is not None and t != tokenizer.eod}))


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ban `cfg.banned_tokens`, then apply repetition penalty (to tokens marked in the (B, V) bool
    `seen`), temperature, top-k and top-p to (B, V) logits; returns float32 with removed tokens
    at -inf (a banned token is never picked, greedy or sampled)."""
    logits = logits.float().clone()
    if cfg.banned_tokens:
        logits[:, list(cfg.banned_tokens)] = float("-inf")
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def pick(
    logits: torch.Tensor, cfg: SamplingConfig, gens: Sequence[torch.Generator], active: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Next token per row (B,) from filtered logits: argmax when greedy, else one draw per row
    from that row's generator (rows marked inactive draw nothing and get argmax)."""
    greedy = logits.argmax(-1)
    if cfg.temperature == 0:
        return greedy
    probs = logits.softmax(-1).cpu()  # draws on CPU: the same on every device and TP rank
    out = greedy.cpu().clone()
    for r, gen in enumerate(gens):
        if active is None or bool(active[r]):
            out[r] = torch.multinomial(probs[r], 1, generator=gen)[0]
    return out.to(logits.device)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids right-aligned, and the (B, T) bool mask of real tokens."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"prompt {i} is empty: a prompt needs at least one token to continue "
                f"(start it with the end-of-document token to sample unconditionally)"
            )
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        real[i, T - len(p) :] = True
    return ids.to(device), real.to(device)


class _Decoder:
    """Next-token logits for a growing left-padded batch, with or without a KV cache."""

    def __init__(self, model: GPT2, ids: torch.Tensor, real: torch.Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.ids, self.real = ids, real  # (B, T) grow by one column per step
        self.positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): pads share position 0
        self.padded = not bool(real.all())
        self.cache = None

    def _mask(self) -> Optional[torch.Tensor]:
        return ~self.real[:, None, None, :] if self.padded else None  # (B, 1, 1, Tk) True = masked

    def first(self) -> torch.Tensor:
        """(B, V) logits after the prompts."""
        if self.use_cache:
            logits, self.cache = self.model(
                self.ids, position_ids=self.positions, kv_cache=[None] * len(self.model.h), attn_mask=self._mask()
            )
            return logits[:, -1]
        return self._full()

    def _full(self) -> torch.Tensor:
        return self.model(self.ids, position_ids=self.positions, attn_mask=self._mask())[:, -1]

    def append(self, tok: torch.Tensor) -> torch.Tensor:
        """Add the (B,) new tokens; (B, V) logits for the step after them."""
        B = tok.shape[0]
        pos = self.positions[:, -1:] + 1  # (B, 1)
        self.ids = torch.cat([self.ids, tok[:, None]], 1)
        self.real = torch.cat([self.real, torch.ones(B, 1, dtype=torch.bool, device=tok.device)], 1)
        self.positions = torch.cat([self.positions, pos], 1)
        if not self.use_cache:
            return self._full()
        logits, self.cache = self.model(tok[:, None], position_ids=pos, kv_cache=self.cache, attn_mask=self._mask())
        return logits[:, -1]


@torch.no_grad()
@overload
def generate(
    model: GPT2,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    pad_id: int = 0,
    return_logits: Literal[False] = False,
    use_cache: bool = True,
    seeds: Optional[Sequence[int]] = None,
    stop_fn: Optional[StopFn] = None,
) -> list[list[int]]: ...


@overload
def generate(
    model: GPT2,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    pad_id: int = 0,
    *,
    return_logits: Literal[True],
    use_cache: bool = True,
    seeds: Optional[Sequence[int]] = None,
    stop_fn: Optional[StopFn] = None,
) -> tuple[list[list[int]], torch.Tensor]: ...


def generate(
    model: GPT2,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    pad_id: int = 0,
    return_logits: bool = False,
    use_cache: bool = True,
    seeds: Optional[Sequence[int]] = None,
    stop_fn: Optional[StopFn] = None,
) -> Union[list[list[int]], tuple[list[list[int]], torch.Tensor]]:
    """Continue each prompt; returns the new tokens per row (list of lists).

    A row stops at `cfg.stop_token` (kept in its output), when `stop_fn(row, tokens)` says so
    (e.g. a stop string appeared; the caller cuts the text), or after max_new_tokens.
    seeds: one per row (default cfg.seed + row index); a row's draws depend only on its seed.
    With return_logits, also returns the (B, steps, V) float32 logits each step was picked from
    (before filtering).
    """
    cfg.validate()
    model.eval()
    device = next(model.parameters()).device
    ids, real = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    if T + cfg.max_new_tokens > model.cfg.n_positions:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
            f"context of {model.cfg.n_positions} tokens; shorten the prompt or lower max_new_tokens"
        )
    seeds = [cfg.seed + r for r in range(B)] if seeds is None else list(seeds)
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    decoder = _Decoder(model, ids, real, use_cache)
    logits = decoder.first()  # (B, V)
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)  # (B, V) tokens in each row
    seen[torch.arange(B, device=device)[:, None].expand(B, T)[real], ids[real]] = True  # real prompt tokens only
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = [cfg.max_new_tokens] * B
    out, all_logits = [], []
    for step in range(cfg.max_new_tokens):
        if return_logits:
            all_logits.append(logits.float())
        tok = pick(filter_logits(logits, cfg, seen), cfg, gens, active=~done)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)  # finished rows idle on padding
        seen[torch.arange(B, device=device), tok] = True
        out.append(tok)
        newly = ~done & (tok == cfg.stop_token) if cfg.stop_token is not None else torch.zeros_like(done)
        if stop_fn is not None:
            rows_so_far = torch.stack(out, 1).tolist()
            for r in range(B):
                if not bool(done[r]) and not bool(newly[r]) and stop_fn(r, rows_so_far[r]):
                    newly[r] = True
        for r in newly.nonzero().flatten().tolist():
            lengths[r] = step + 1
        done |= newly
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        logits = decoder.append(tok)
    rows = [r[:n] for r, n in zip(torch.stack(out, 1).tolist(), lengths)]
    return (rows, torch.stack(all_logits, 1)) if return_logits else rows
