"""Fused LayerNorm over the last dimension: Triton forward + backward in one autograd Function.

Forward: one program per row, BLOCK_N = next_power_of_2(hidden), fp32 mean/rstd saved (8 bytes a
row). Backward: each program walks a contiguous group of rows, writes dx per row and keeps fp32
partial sums of dw/db in registers; the partials land in a (programs, hidden) buffer that a
second small kernel sums column by column and casts. No atomics, so weight/bias gradients are
bitwise deterministic run to run.
"""

from __future__ import annotations

import torch

from megagpt2.kernels import runtime

# Largest hidden size kept in one block of registers (64 KiB of the input dtype per row).
MAX_FUSED_BYTES = 65536
# Tile of the dw/db partial reduction: BLOCK_P partial rows x BLOCK_C columns per step.
DWDB_BLOCK_P, DWDB_BLOCK_C = 32, 64


def _kernels():
    k = runtime.kernel_module()  # imports triton: only on first launch
    return k.ln_fwd_kernel, k.ln_bwd_kernel, k.ln_dwdb_kernel


def _block_for(n: int, x: torch.Tensor) -> int:
    block = runtime.next_power_of_2(n)
    if block * x.element_size() > MAX_FUSED_BYTES:
        raise ValueError(
            f"layer_norm: hidden size {n} in {x.dtype} exceeds the fused kernel's "
            f"{MAX_FUSED_BYTES} bytes per row; use impl='torch' for this size"
        )
    return block


def bwd_programs(rows: int, device: torch.device) -> int:
    """How many backward programs share the rows: a few waves of SMs on CUDA, 4 elsewhere.

    Fewer programs = smaller partial buffer; more = more memory parallelism. 4 per SM keeps
    the (programs, hidden) fp32 partials at a few MB for GPT-2 shapes.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # interpreter: still exercises several rows per program


def ln_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """x2d (M, N) with unit last stride -> (y (M, N), mean (M,), rstd (M,))."""
    fwd, _, _ = _kernels()
    m, n = x2d.shape
    block = _block_for(n, x2d)
    y = torch.empty_like(x2d)
    mean = torch.empty(m, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2d.device)
    if m > 0:
        with runtime.on_device(x2d):
            fwd[(m,)](
                x2d,
                y,
                weight,
                bias,
                mean,
                rstd,
                x2d.stride(0),
                y.stride(0),
                n,
                eps,
                BLOCK_N=block,
                num_warps=runtime.num_warps_for(block),
            )
    return y, mean, rstd


def ln_backward(dy2d, x2d, weight, mean, rstd):
    """(M, N) grads -> (dx (M, N) in x's dtype, dw (N,), db (N,) in weight's dtype)."""
    _, bwd, dwdb = _kernels()
    m, n = x2d.shape
    block = _block_for(n, x2d)
    dx = torch.empty_like(x2d)
    programs = bwd_programs(m, x2d.device)
    rows_per_prog = -(-m // programs)
    programs = -(-m // rows_per_prog)  # drop programs that would own no row
    dw_part, db_part = torch.empty((2, programs, n), dtype=torch.float32, device=x2d.device)
    with runtime.on_device(x2d):
        bwd[(programs,)](
            dy2d,
            x2d,
            weight,
            mean,
            rstd,
            dx,
            dw_part,
            db_part,
            dy2d.stride(0),
            x2d.stride(0),
            dx.stride(0),
            m,
            n,
            rows_per_prog,
            BLOCK_N=block,
            num_warps=runtime.num_warps_for(block),
        )
        dw = torch.empty(n, dtype=weight.dtype, device=x2d.device)
        db = torch.empty_like(dw)
        dwdb[(-(-n // DWDB_BLOCK_C),)](
            dw_part,
            db_part,
            dw,
            db,
            programs,
            n,
            BLOCK_P=DWDB_BLOCK_P,
            BLOCK_C=DWDB_BLOCK_C,
            num_warps=4,
        )
    return dx, dw, db


class TritonLayerNorm(torch.autograd.Function):
    """fwd: Triton LayerNorm (fp32 stats); bwd: Triton dx + deterministic dw/db partial sums."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        runtime.check_triton_device(x, weight, bias)
        n = x.shape[-1]
        x2d = x.reshape(-1, n)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, mean, rstd = ln_forward(x2d, weight.contiguous(), bias.contiguous(), eps)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, mean, rstd = ctx.saved_tensors
        if x2d.shape[0] == 0:
            zeros = torch.zeros_like(weight)
            return dy.new_zeros(dy.shape), zeros, zeros.clone(), None
        dy2d = dy.reshape(-1, x2d.shape[1]).contiguous()
        dx, dw, db = ln_backward(dy2d, x2d, weight.contiguous(), mean, rstd)
        return dx.view(dy.shape), dw, db, None


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Triton LayerNorm over the last dim; output in x's dtype, grads for x, weight and bias."""
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(
            f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both "
            f"be ({n},) to match the input's last dimension"
        )
    return TritonLayerNorm.apply(x, weight, bias, eps)
