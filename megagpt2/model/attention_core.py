"""Causal attention core: softmax(q k^T / sqrt(D)) v with three interchangeable paths.

    flash          torch scaled_dot_product_attention (never materialises probabilities)
    fused_softmax  q@k^T, then our fused scale + causal mask + softmax kernel, dropout, @v
    torch          the explicit reference: q@k^T, scale, masked_fill(-inf), softmax, dropout, @v

All three give the same result (up to rounding) with dropout off. With Tk > Tq (a KV cache
holding Tk - Tq earlier positions) query i attends keys <= i + (Tk - Tq) on every path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megagpt2.kernels import causal_mask, scaled_masked_softmax

PATHS = ("flash", "fused_softmax", "torch")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    path: str,
    kernels: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention. q (B, H, Tq, D), k and v (B, H, Tk, D) with Tk >= Tq -> (B, H, Tq, D).

    path selects the implementation (PATHS); kernels is the `model.kernels` selector used by the
    fused_softmax path. Dropout (on the probabilities) applies only when `training`.
    mask: optional bool, True = masked out, broadcastable to (B, H, Tq, Tk) (e.g. left padding
    as (B, 1, Tq, Tk)), combined with the causal mask; queries that see no key output zeros.
    scale defaults to 1 / sqrt(D).
    """
    if path not in PATHS:
        raise ValueError(f"unknown attention path {path!r}; expected one of {PATHS}")
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"attention expects q (B, H, Tq, D) and k, v (B, H, Tk, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    tq, tk = q.shape[2], k.shape[2]
    if tk < tq:
        raise ValueError(f"attention needs Tk >= Tq (keys include the queries); got {tk} < {tq}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p_drop = dropout_p if training else 0.0
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be torch.bool (True = masked out), got {mask.dtype}")
    if path == "flash":
        return _flash(q, k, v, p_drop, scale, mask)
    scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    if path == "fused_softmax":
        probs = scaled_masked_softmax(scores, scale, causal=True, mask=mask, impl=kernels)
    else:
        probs = _reference_probs(scores, scale, mask)
    if p_drop > 0.0:
        probs = F.dropout(probs, p=p_drop, training=True)
    return probs @ v  # (B, H, Tq, D)


def _reference_probs(scores: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """scale, masked_fill(-inf) above the (offset) diagonal, softmax in fp32, back to dtype."""
    tq, tk = scores.shape[-2:]
    masked = causal_mask(tq, tk, scores.device)  # (Tq, Tk), True = masked
    if mask is not None:
        masked = masked | mask  # (B, 1|H, Tq, Tk)
    x = (scores.float() * scale).masked_fill(masked, float("-inf"))
    if mask is None:  # causal with Tk >= Tq: every query sees at least one key
        return torch.softmax(x, dim=-1).to(scores.dtype)
    dead = masked.all(dim=-1, keepdim=True)  # queries with no key: zeros, not 0/0 = NaN
    probs = torch.softmax(x.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return probs.to(scores.dtype)


def _flash(q, k, v, p_drop: float, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """sdpa's is_causal aligns the mask to the top-left, so Tk > Tq needs an explicit mask."""
    tq, tk = q.shape[2], k.shape[2]
    if mask is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True, scale=scale)
    if mask is None and tq == 1:  # one new token attends every cached key: no mask at all
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, scale=scale)
    masked = causal_mask(tq, tk, q.device)  # (Tq, Tk), True = masked
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked, dropout_p=p_drop, scale=scale)
    masked = masked | mask
    # Backends disagree on rows with no visible key (NaN or zeros): open them up so every
    # backend stays finite, then zero those outputs, as the other two paths do.
    dead = masked.all(dim=-1, keepdim=True)  # (B, 1|H, Tq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked | dead, dropout_p=p_drop, scale=scale)
    return out.masked_fill(dead, 0.0)
