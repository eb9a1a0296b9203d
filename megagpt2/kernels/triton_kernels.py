"""Triton kernel bodies for LayerNorm and scaled masked softmax.

Never imported normally: `runtime.kernel_module()` executes this file once per interpreter mode
(TRITON_INTERPRET on/off), so `@triton.jit` below decides compiled-vs-interpreted for that copy.
Only builtins of triton.language are called here, never its jit-decorated helpers (`tl.sum`,
`tl.max`, `tl.zeros`, `tl.cdiv`, ...): those were decorated once, in whatever mode was active
when triton was first imported; called in the other mode they fail, and an interpreted one
leaves triton.language patched so that later compilation in the process breaks (triton 3.9).
Hence `tl.reduce` with `_add` / `_maximum` and `tl.full` for zeros. In the interpreter `_add`
and `_maximum` are triton's own combiners, which it reduces with numpy instead of calling them.
All arithmetic is fp32: loads are upcast, stores cast to the output's dtype.
"""

import triton
import triton.language as tl

from megagpt2.kernels.runtime import triton_interpreting


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


if triton_interpreting():  # the interpreter's fast paths recognise triton's own combiners
    _add = getattr(tl.standard, "_sum_combine", _add)
    _maximum = getattr(tl.standard, "_elementwise_max", _maximum)


@triton.jit
def ln_fwd_kernel(
    X,
    Y,
    W,
    B,
    Mean,
    Rstd,  # X, Y: (M, N) rows; W, B: (N,); Mean, Rstd: (M,) fp32
    stride_x,
    stride_y,
    N,
    eps,
    BLOCK_N: tl.constexpr,
):
    """One row per program: y = (x - mean) * rstd * w + b, saving mean and rstd for backward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 0, _add) / N
    xc = tl.where(cmask, x - mean, 0.0)  # padding lanes must not enter the variance
    var = tl.reduce(xc * xc, 0, _add) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cmask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def ln_bwd_kernel(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DX,  # DY, X, DX: (M, N); W: (N,); Mean, Rstd: (M,) fp32
    DW_part,
    DB_part,  # (programs, N) fp32: this program's partial weight/bias gradients
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_prog,
    BLOCK_N: tl.constexpr,
):
    """Rows [pid * R, (pid + 1) * R): dx per row, and dw/db summed over those rows.

    dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)). The partial sums go to this
    program's own slot; `ln_dwdb_kernel` sums the slots (fixed order, so deterministic, unlike
    an atomic_add across programs).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.full([BLOCK_N], 0.0, tl.float32)
    db_acc = tl.full([BLOCK_N], 0.0, tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        # Rows past M (last program) are fully masked; clamp only the scalar loads' address.
        live = cols < tl.where(row < M, N, 0)
        srow = tl.minimum(row, M - 1)
        mean = tl.load(Mean + srow)
        rstd = tl.load(Rstd + srow)
        x = tl.load(X + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
        xhat = tl.where(live, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.reduce(xhat * wdy, 0, _add) / N
        c2 = tl.reduce(wdy, 0, _add) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=live)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(DW_part + pid * N + cols, dw_acc, mask=cmask)
    tl.store(DB_part + pid * N + cols, db_acc, mask=cmask)


@triton.jit
def ln_dwdb_kernel(
    DW_part,
    DB_part,
    DW,
    DB,  # partials (P, N) fp32 -> DW, DB (N,) in the weight's dtype
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Column sums of the backward's partials, in a fixed order, cast on store.

    One launch instead of torch's sum + cast for each of dw and db: four small kernels, whose
    gaps would be a sizeable share of a LayerNorm that runs for tens of microseconds (an
    estimate; not yet measured on a GPU). The partials were just written, so they come from L2.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < N
    dw = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    db = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    for p0 in range(0, P, BLOCK_P):
        prow = p0 + tl.arange(0, BLOCK_P)
        offs = prow[:, None] * N + cols[None, :]
        m = (prow[:, None] < P) & cmask[None, :]
        dw += tl.load(DW_part + offs, mask=m, other=0.0)
        db += tl.load(DB_part + offs, mask=m, other=0.0)
    tl.store(DW + cols, tl.reduce(dw, 0, _add).to(DW.dtype.element_ty), mask=cmask)
    tl.store(DB + cols, tl.reduce(db, 0, _add).to(DB.dtype.element_ty), mask=cmask)


# Softmax: rows are the flattened (B, H, Tq) of contiguous (B, H, Tq, Tk) scores, one program
# per row. Causal rows read only their first limit = i + (Tk - Tq) + 1 keys, rounded up to 16
# ("min((limit + 15) // 16 * 16, Tk)", which the compiler can prove 16-aligned when Tk is) so
# masked loads stay 128-bit vectors: about half the reads of a square causal softmax. Explicit
# masks are applied in arithmetic, not in the load mask, for the same reason.


@triton.jit
def softmax_fwd_kernel(
    S,
    P,
    Mask,  # S, P: (rows, Tk); Mask: uint8 view of a bool mask expanded to (B, H, Tq, Tk)
    scale,
    Tq,
    Tk,
    H,
    causal_offset,  # causal_offset = Tk - Tq
    sm_b,
    sm_h,
    sm_q,
    sm_k,  # mask strides (0 on broadcast dims)
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """p = softmax(where(masked, -inf, s * scale)); rows with every key masked give zeros."""
    row = tl.program_id(0).to(tl.int64)
    q = row % Tq
    cols = tl.arange(0, BLOCK)
    in_row = cols < Tk
    if CAUSAL:
        limit = tl.minimum(q + causal_offset + 1, Tk)
        live = cols < limit
        loaded = cols < tl.minimum((limit + 15) // 16 * 16, Tk)
    else:
        live = in_row
        loaded = in_row
    if HAS_MASK:
        bh = row // Tq
        mptr = Mask + (bh // H) * sm_b + (bh % H) * sm_h + q * sm_q + cols * sm_k
        live = live & (tl.load(mptr, mask=live, other=1) == 0)
    s = tl.load(S + row * Tk + cols, mask=loaded, other=0.0).to(tl.float32)
    x = tl.where(live, s * scale, float("-inf"))
    m = tl.reduce(x, 0, _maximum)
    m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: avoid (-inf) - (-inf)
    e = tl.exp(x - m)  # masked lanes: exp(-inf) = 0
    total = tl.reduce(e, 0, _add)
    p = e * (1.0 / tl.where(total > 0.0, total, 1.0))  # total == 0 only when all e are 0
    tl.store(P + row * Tk + cols, p.to(P.dtype.element_ty), mask=in_row)


@triton.jit
def softmax_bwd_kernel(
    DY,
    P,
    DX,  # (rows, Tk) each
    scale,
    Tq,
    Tk,
    causal_offset,
    CAUSAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dx = scale * p * (dy - sum(dy * p)) from the saved probabilities (p = 0 where masked)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < Tk
    if CAUSAL:  # p is 0 past the causal limit: skip those reads (dy there is irrelevant)
        limit = tl.minimum(row % Tq + causal_offset + 1, Tk)
        loaded = cols < tl.minimum((limit + 15) // 16 * 16, Tk)
    else:
        loaded = in_row
    p = tl.load(P + row * Tk + cols, mask=loaded, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * Tk + cols, mask=loaded, other=0.0).to(tl.float32)
    dot = tl.reduce(p * dy, 0, _add)
    dx = scale * p * (dy - dot)
    tl.store(DX + row * Tk + cols, dx.to(DX.dtype.element_ty), mask=in_row)
