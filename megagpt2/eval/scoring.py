"""The one computation every evaluation shares: per-token negative log-likelihoods of targets.

`token_nll` runs the model on a right-padded batch and returns -log p(target | prefix) per
position (float64, 0 where the target is -100), and optionally whether the greedy (argmax) token
equals the target. The output head runs at the scored positions only. At tp>1 the loss goes
through the vocabulary-parallel cross-entropy, so the model never gathers full-vocabulary
logits for it; only the greedy check gathers them.

`score_continuations` scores (context, continuation) pairs, the building block of LAMBADA,
multiple choice and few-shot prompting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..model import GPT2
from ..parallel.cross_entropy import vocab_parallel_cross_entropy

IGNORE = -100


@torch.no_grad()
def token_nll(
    model: GPT2, inputs: torch.Tensor, targets: torch.Tensor, greedy: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """inputs, targets (B, T) -> nll (B, T) float64 and, with greedy, argmax == target (B, T) bool.

    The output head runs only at the scored positions (targets != -100): a LAMBADA example scores
    1-3 of its ~80 positions, and the (positions x vocabulary) logits are most of the cost.
    """
    x = model.embed(inputs)  # (B, T, C)
    x, _ = model.run_blocks(x)
    scored = targets != IGNORE  # (B, T)
    picked = x[scored][None]  # (1, N, C)
    local = model.logits_local(picked)  # (1, N, V/tp)
    nll = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
    if model.groups.layout.tp == 1:  # one fused kernel, no padding columns, no softmax kept for a backward
        per = F.cross_entropy(local[0, :, : model.cfg.vocab_size].float(), targets[scored], reduction="none")
    else:
        per = vocab_parallel_cross_entropy(local, targets[scored][None], model.groups.tp, model.cfg.vocab_size, IGNORE)[
            0
        ]
    nll[scored] = per.double()
    correct = None
    if greedy:
        correct = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
        correct[scored] = model.full_logits(local).argmax(-1)[0] == targets[scored]  # (N,)
    return nll, correct


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """(B, max_len) long tensor, each row left-aligned and padded with `pad`."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


@dataclass
class Score:
    """Log-likelihood of one continuation given its context."""

    nll: float  # -sum log p over the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token is the argmax given the (teacher-forced) prefix
    truncated: bool  # the context was cut from the left to fit the model's window


def score_continuations(
    model: GPT2,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad: int,
    batch_size: int = 8,
    max_len: Optional[int] = None,
    progress: Optional[Callable[[int], object]] = None,
) -> list[Score]:
    """Score each (context, continuation) pair: the continuation's tokens given the context.

    The input is context + continuation[:-1]; if it is longer than `max_len` (default: the
    model's n_positions) the context is cut from the left. Contexts must be non-empty (put the
    end-of-document token first to score text from the start). Pairs are batched by length.
    """
    max_len = max_len or model.cfg.n_positions
    device = next(model.parameters()).device
    for i, (ctx, cont) in enumerate(pairs):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"example {i}: empty {'context' if len(ctx) == 0 else 'continuation'}")
        if len(cont) > max_len:
            raise ValueError(f"example {i}: continuation of {len(cont)} tokens does not fit the {max_len}-token window")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[Optional[Score]] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs, conts, cut = [], [], []
        for i in idx:
            ctx, cont = list(pairs[i][0]), list(pairs[i][1])
            full = (ctx + cont)[-(max_len + 1) :]
            seqs.append(full)
            conts.append(len(cont))
            cut.append(len(full) < len(ctx) + len(cont))
        inputs = right_pad([s[:-1] for s in seqs], pad)
        targets = torch.full_like(inputs, IGNORE)
        for row, (s, n) in enumerate(zip(seqs, conts)):
            L = len(s) - 1
            targets[row, L - n : L] = torch.tensor(s[-n:], dtype=torch.long)
        nll, correct = token_nll(model, inputs.to(device), targets.to(device), greedy=True)
        scored = (targets != IGNORE).to(device)
        for row, i in enumerate(idx):
            out[i] = Score(float(nll[row].sum()), conts[row], bool(correct[row][scored[row]].all()), cut[row])
        if progress is not None:
            progress(len(idx))
    return out  # type: ignore[return-value]


def batched(items: Iterable, n: int):
    """Lists of up to n consecutive items."""
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
