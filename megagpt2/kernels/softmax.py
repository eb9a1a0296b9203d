"""Fused scale + mask + softmax for attention scores: Triton forward/backward in one Function.

Forward reads scores once and writes probabilities once (the unfused torch sequence reads and
writes the full tensor three times); backward reads the saved probabilities and dy once and
writes dx once. Causal rows skip the masked tail's reads in both directions.
"""

from __future__ import annotations

import torch

from megagpt2.kernels import runtime

MAX_KEYS = 32768  # one row in registers; longer rows belong to the flash path


def _kernels():
    k = runtime.kernel_module()  # imports triton: only on first launch
    return k.softmax_fwd_kernel, k.softmax_bwd_kernel


def _launch_config(tk: int) -> tuple[int, int]:
    if tk > MAX_KEYS:
        raise ValueError(
            f"scaled_masked_softmax: {tk} keys exceed the fused kernel's {MAX_KEYS}; "
            "use the flash attention path or impl='torch'"
        )
    block = runtime.next_power_of_2(tk)
    return block, min(runtime.num_warps_for(block), 8)


def _expanded_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bool mask broadcast to `shape` (a view, stride 0 on broadcast dims) as uint8."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool (True = masked out), got {mask.dtype}")
    try:
        full = mask.expand(shape)
    except RuntimeError as err:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to scores {tuple(shape)}") from err
    return full.view(torch.uint8)


def softmax_forward(scores, scale: float, causal: bool, mask):
    """scores (B, H, Tq, Tk) contiguous -> probabilities, same shape and dtype."""
    fwd, _ = _kernels()
    b, h, tq, tk = scores.shape
    block, warps = _launch_config(tk)
    probs = torch.empty_like(scores)
    rows = b * h * tq
    if rows == 0 or tk == 0:
        return probs
    if mask is not None:
        m8 = _expanded_mask(mask, scores.shape)
        strides = m8.stride()
    else:
        m8, strides = scores, (0, 0, 0, 0)  # placeholder pointer, never read (HAS_MASK=False)
    with runtime.on_device(scores):
        fwd[(rows,)](
            scores,
            probs,
            m8,
            float(scale),
            tq,
            tk,
            h,
            tk - tq,
            *strides,
            CAUSAL=causal,
            HAS_MASK=mask is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return probs


def softmax_backward(dy, probs, scale: float, causal: bool):
    """dy, probs (B, H, Tq, Tk) contiguous -> d scores."""
    _, bwd = _kernels()
    b, h, tq, tk = probs.shape
    block, warps = _launch_config(tk)
    dx = torch.empty_like(probs)
    rows = b * h * tq
    if rows == 0 or tk == 0:
        return dx
    with runtime.on_device(probs):
        bwd[(rows,)](
            dy,
            probs,
            dx,
            float(scale),
            tq,
            tk,
            tk - tq,
            CAUSAL=causal,
            BLOCK=block,
            num_warps=warps,
        )
    return dx


class TritonScaledMaskedSoftmax(torch.autograd.Function):
    """fwd: softmax(mask(scale * s)) in one pass; bwd: scale * p * (dy - sum(dy * p))."""

    @staticmethod
    def forward(ctx, scores, scale: float, causal: bool, mask):
        runtime.check_triton_device(scores)
        probs = softmax_forward(scores.contiguous(), scale, causal, mask)
        ctx.save_for_backward(probs)
        ctx.scale, ctx.causal = scale, causal
        return probs

    @staticmethod
    def backward(ctx, dy):
        (probs,) = ctx.saved_tensors
        dx = softmax_backward(dy.contiguous(), probs, ctx.scale, ctx.causal)
        return dx, None, None, None


def scaled_masked_softmax_triton(
    scores: torch.Tensor,
    scale: float,
    causal: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton scale + mask + softmax over the last dim of scores (B, H, Tq, Tk)."""
    if scores.dim() != 4:
        raise ValueError(f"scores must be (B, H, Tq, Tk), got shape {tuple(scores.shape)}")
    if mask is not None and mask.device != scores.device:
        raise ValueError(f"mask is on {mask.device} but scores are on {scores.device}")
    return TritonScaledMaskedSoftmax.apply(scores, scale, causal, mask)
