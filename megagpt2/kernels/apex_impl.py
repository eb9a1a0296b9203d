"""Adapters to NVIDIA apex's fused kernels, used only when apex is importable (never required).

apex's causal softmax kernel covers square, unpadded, fp16/bf16 scores of moderate length; other
cases (KV-cache offsets, explicit masks, fp32, long rows) go to the Triton kernel so that the
semantics (including zeros for fully masked rows) never depend on the backend.
"""

from __future__ import annotations

import torch

from megagpt2.kernels.softmax import scaled_masked_softmax_triton


def layer_norm_apex(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """apex's fused_layer_norm_affine over the last dimension."""
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine  # pyright: ignore[reportMissingImports]

    return fused_layer_norm_affine(x, weight, bias, weight.shape, eps)


def apex_softmax_supported(scores: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> bool:
    """Whether apex's upper-triangular softmax kernel applies to these arguments."""
    if not causal or mask is not None or scores.dtype not in (torch.float16, torch.bfloat16):
        return False
    b, h, tq, tk = scores.shape
    return tq == tk and 16 < tk <= 2048 and tk % 4 == 0 and (b * h) % 4 == 0


def scaled_masked_softmax_apex(scores, scale: float, causal: bool = True, mask=None):
    """apex's ScaledUpperTriangMaskedSoftmax where it applies, else the Triton kernel."""
    if not apex_softmax_supported(scores, causal, mask):
        return scaled_masked_softmax_triton(scores, scale, causal, mask)
    from apex.transformer.functional.fused_softmax import (  # pyright: ignore[reportMissingImports]
        ScaledUpperTriangMaskedSoftmax,
    )

    b, h, tq, tk = scores.shape
    probs = ScaledUpperTriangMaskedSoftmax.apply(scores.reshape(b * h, tq, tk), scale)
    return probs.view(b, h, tq, tk)
