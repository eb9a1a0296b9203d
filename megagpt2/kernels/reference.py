"""PyTorch references for the fused kernels: same signatures, plain autograd, no Triton.

These define the semantics the Triton kernels are tested against and are what `impl="torch"`
(and `auto` on CPU) runs. They favour clarity and accuracy: low-precision inputs are computed in
fp32 and cast back, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension with fp32 statistics; output in x's dtype."""
    n = x.shape[-1]
    if x.dtype == weight.dtype == bias.dtype:
        # torch's native kernel already keeps fp32 statistics for bf16/fp16 inputs.
        return F.layer_norm(x, (n,), weight, bias, eps)
    y = F.layer_norm(x.float(), (n,), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True = masked out: query i sees keys j <= i + (Tk - Tq) (KV-cache aligned)."""
    q = torch.arange(tq, device=device).unsqueeze(1)  # (Tq, 1)
    k = torch.arange(tk, device=device).unsqueeze(0)  # (1, Tk)
    return k > q + (tk - tq)


def scaled_masked_softmax_ref(
    scores: torch.Tensor,
    scale: float,
    causal: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(masked_fill(scores * scale, mask, -inf)) over the last dim; fully masked rows -> 0.

    scores (B, H, Tq, Tk); mask bool (True = masked out), broadcastable to scores; the causal
    mask is aligned to the end so query i sees keys <= i + (Tk - Tq).
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be (B, H, Tq, Tk), got shape {tuple(scores.shape)}")
    tq, tk = scores.shape[-2:]
    masked = torch.zeros((1, 1, tq, tk), dtype=torch.bool, device=scores.device)
    if causal:
        masked = masked | causal_mask(tq, tk, scores.device)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool (True = masked out), got {mask.dtype}")
        masked = masked | mask
    x = (scores.float() * scale).masked_fill(masked, float("-inf"))  # (B, H, Tq, Tk)
    # A row with every key masked would be 0/0 = NaN (and NaN gradients): define it as zeros.
    dead = masked.all(dim=-1, keepdim=True)  # (.., Tq, 1)
    p = torch.softmax(x.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p.to(scores.dtype)
