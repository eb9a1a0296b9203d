"""Fused kernels (Triton) with PyTorch references and one selector.

    layer_norm(x, weight, bias, eps=1e-5, impl="auto")
    LayerNorm(hidden, eps=1e-5, impl="auto")
    scaled_masked_softmax(scores, scale, causal=True, mask=None, impl="auto")
    resolve_impl(impl, device)  # "auto" -> "triton" on CUDA, "torch" elsewhere

impl in {"auto", "triton", "torch", "apex"} (config key `model.kernels`). Importing this package
does not import triton; kernels are compiled (or, with TRITON_INTERPRET=1, interpreted on CPU)
on first use. See docs/kernels.md.
"""

from __future__ import annotations

import torch
from torch import nn

from megagpt2.kernels.reference import (
    causal_mask,
    layer_norm_ref,
    scaled_masked_softmax_ref,
)
from megagpt2.kernels.runtime import IMPLS, apex_available, interpret_enabled, resolve_impl

__all__ = [
    "IMPLS",
    "LayerNorm",
    "apex_available",
    "causal_mask",
    "interpret_enabled",
    "layer_norm",
    "layer_norm_ref",
    "resolve_impl",
    "scaled_masked_softmax",
    "scaled_masked_softmax_ref",
]


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dimension (fp32 statistics, output in x's dtype)."""
    which = resolve_impl(impl, x.device)
    if which == "triton":
        from megagpt2.kernels.layernorm import layer_norm_triton

        return layer_norm_triton(x, weight, bias, eps)
    if which == "apex":
        from megagpt2.kernels.apex_impl import layer_norm_apex

        return layer_norm_apex(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


def scaled_masked_softmax(
    scores: torch.Tensor,
    scale: float,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """softmax(masked_fill(scores * scale, mask, -inf), -1) for scores (B, H, Tq, Tk).

    mask: bool, True = masked out, broadcastable to scores. The causal mask lets query i see
    keys <= i + (Tk - Tq) (KV-cache aligned). Rows with every key masked give zeros.
    """
    which = resolve_impl(impl, scores.device)
    if which == "triton":
        from megagpt2.kernels.softmax import scaled_masked_softmax_triton

        return scaled_masked_softmax_triton(scores, scale, causal, mask)
    if which == "apex":
        from megagpt2.kernels.apex_impl import scaled_masked_softmax_apex

        return scaled_masked_softmax_apex(scores, scale, causal, mask)
    return scaled_masked_softmax_ref(scores, scale, causal, mask)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with a selectable kernel; `weight` ones, `bias` zeros."""

    def __init__(self, hidden: int, eps: float = 1e-5, impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {IMPLS}")
        self.hidden, self.eps, self.impl = hidden, eps, impl
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, self.impl)

    def extra_repr(self) -> str:
        return f"{self.hidden}, eps={self.eps}, impl={self.impl}"
