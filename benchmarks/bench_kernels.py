"""Microbenchmark of the fused kernels against torch eager, torch.compile and apex.

For GPT-2 shapes (LayerNorm on (tokens, hidden); causal softmax on (batch x heads, seq, seq))
it times forward and forward+backward, derives backward as the difference, and reports
achieved GB/s and the fraction of the device's measured copy bandwidth.

Bytes are the *essential* traffic of the operation, the same figure for every implementation:
  LayerNorm fwd: read x, w, b; write y, mean, rstd.  bwd: read x, dy, w, mean, rstd; write dx,
  dw, db.  Softmax fwd: read the unmasked scores (causal: about half), write all probabilities.
  bwd: read unmasked p and dy, write all of dx.
So "GB/s" compares like with like, and 100% of copy bandwidth is the best any kernel could do.

    python benchmarks/bench_kernels.py                       # CUDA, bf16, all GPT-2 sizes
    python benchmarks/bench_kernels.py --dtype fp16 --compile largest --out figures.json
Figures are printed, never asserted on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from megagpt2.kernels import causal_mask, layer_norm, scaled_masked_softmax  # noqa: E402
from megagpt2.kernels.runtime import apex_available, interpret_enabled  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class Timer:
    """Median wall time of fn() in ms; CUDA events with an L2 flush between calls on GPUs."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"
        # Bigger than any L2 (H200: 60 MB) so each timed call starts from HBM, like in training.
        self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]
        torch.cuda.synchronize(self.device)
        events = []
        for _ in range(self.iters):
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        times = sorted(s.elapsed_time(e) for s, e in events)
        return times[len(times) // 2]


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Device copy bandwidth in GB/s: bytes read + written by dst.copy_(src), 1 GiB on CUDA."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def fwd_and_fwdbwd(op: Callable, inputs: list[torch.Tensor], dy: torch.Tensor, timer: Timer):
    """(fwd ms, fwd+bwd ms): bwd runs through autograd.grad, so no .grad accumulation is timed."""

    def fwd():
        return op(*inputs)

    def fwd_bwd():
        torch.autograd.grad(op(*inputs), inputs, dy)

    return timer(fwd), timer(fwd_bwd)


def layernorm_impls(args, device) -> dict[str, Callable]:
    impls: dict[str, Callable] = {}
    eager = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)  # noqa: E731
    if _triton_usable(device):
        impls["triton"] = lambda x, w, b: layer_norm(x, w, b, 1e-5, impl="triton")
    impls["torch eager"] = eager
    if args.compile != "none":
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    if device.type == "cuda" and apex_available():
        impls["apex"] = lambda x, w, b: layer_norm(x, w, b, 1e-5, impl="apex")
    return impls


def softmax_impls(args, device, mask: torch.Tensor, scale: float) -> dict[str, Callable]:
    impls: dict[str, Callable] = {}

    def unfused(s):  # the sequence the fused kernel replaces: scale, masked_fill, softmax
        return torch.softmax((s * scale).masked_fill(mask, float("-inf")), dim=-1)

    if _triton_usable(device):
        impls["triton"] = lambda s: scaled_masked_softmax(s, scale, True, impl="triton")
    impls["torch eager"] = unfused
    if args.compile != "none":
        impls["torch.compile"] = torch.compile(unfused, dynamic=False)
    if device.type == "cuda" and apex_available():
        from megagpt2.kernels.apex_impl import scaled_masked_softmax_apex

        impls["apex"] = lambda s: scaled_masked_softmax_apex(s, scale, True)
    return impls


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or interpret_enabled()


def bench_layernorm(args, device, dtype, hidden: int, timer: Timer, copy_bw: float) -> list[dict]:
    m, n, e = args.tokens, hidden, torch.finfo(dtype).bits // 8
    x = torch.randn(m, n, dtype=dtype, device=device, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    dy = torch.randn_like(x)
    fwd_bytes = 2 * m * n * e + 2 * n * e + 8 * m
    bwd_bytes = 3 * m * n * e + 8 * m + 3 * n * e
    rows = []
    for name, op in layernorm_impls(args, device).items():
        if name == "torch.compile" and args.compile == "largest" and hidden != max(args.hidden):
            continue
        f_ms, fb_ms = fwd_and_fwdbwd(op, [x, w, b], dy, timer)
        rows.append(_row("layernorm", f"({m}, {n})", name, f_ms, fb_ms, fwd_bytes, bwd_bytes, copy_bw))
    return rows


def _heads(args, hidden: int) -> int:
    return args.heads or GPT2_HEADS.get(hidden, max(1, hidden // 64))


def _first_hidden_per_heads(args) -> dict[int, int]:
    """Softmax shapes depend on heads only: bench each distinct head count once."""
    first: dict[int, int] = {}
    for hidden in args.hidden:
        first.setdefault(_heads(args, hidden), hidden)
    return first


def bench_softmax(args, device, dtype, hidden: int, timer: Timer, copy_bw: float) -> list[dict]:
    heads = _heads(args, hidden)
    bh, t, e = args.batch * heads, args.seq, torch.finfo(dtype).bits // 8
    scores = torch.randn(args.batch, heads, t, t, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn_like(scores)
    mask = causal_mask(t, t, device)
    live = bh * t * (t + 1) // 2  # unmasked elements of a square causal softmax
    fwd_bytes = live * e + bh * t * t * e
    bwd_bytes = 2 * live * e + bh * t * t * e
    rows = []
    scale = 1.0 / math.sqrt(64)
    for name, op in softmax_impls(args, device, mask, scale).items():
        if name == "torch.compile" and args.compile == "largest" and hidden != max(args.hidden):
            continue
        f_ms, fb_ms = fwd_and_fwdbwd(op, [scores], dy, timer)
        shape = f"({args.batch}x{heads}, {t}, {t})"
        rows.append(_row("softmax", shape, name, f_ms, fb_ms, fwd_bytes, bwd_bytes, copy_bw))
    return rows


def _row(kernel, shape, impl, f_ms, fb_ms, fwd_bytes, bwd_bytes, copy_bw) -> dict:
    gbps = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")  # noqa: E731
    b_ms = max(fb_ms - f_ms, 0.0)
    total = gbps(fwd_bytes + bwd_bytes, fb_ms)
    return {
        "kernel": kernel, "shape": shape, "impl": impl,
        "fwd_ms": f_ms, "bwd_ms": b_ms, "fwd_bwd_ms": fb_ms,
        "fwd_gbps": gbps(fwd_bytes, f_ms), "bwd_gbps": gbps(bwd_bytes, b_ms),
        "fwd_bwd_gbps": total, "frac_copy_bw": total / copy_bw,
        "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes,
    }


def add_speedups(rows: list[dict]) -> None:
    """speedup = torch eager fwd+bwd time / this row's, within the same kernel and shape."""
    eager = {(r["kernel"], r["shape"]): r["fwd_bwd_ms"] for r in rows if r["impl"] == "torch eager"}
    for r in rows:
        base = eager.get((r["kernel"], r["shape"]))
        r["speedup_vs_eager"] = base / r["fwd_bwd_ms"] if base else float("nan")


def format_table(rows: list[dict]) -> str:
    head = (f"{'kernel':<10} {'shape':<21} {'impl':<13} {'fwd ms':>8} {'GB/s':>7} {'bwd ms':>8} "
            f"{'GB/s':>7} {'f+b ms':>8} {'GB/s':>7} {'% copy':>7} {'vs eager':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kernel']:<10} {r['shape']:<21} {r['impl']:<13} {r['fwd_ms']:8.3f} "
            f"{r['fwd_gbps']:7.0f} {r['bwd_ms']:8.3f} {r['bwd_gbps']:7.0f} {r['fwd_bwd_ms']:8.3f} "
            f"{r['fwd_bwd_gbps']:7.0f} {100 * r['frac_copy_bw']:6.1f}% {r['speedup_vs_eager']:7.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, default=8192, help="LayerNorm rows (batch x seq)")
    p.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")],
                   default=[768, 1024, 1280, 1600], help="comma-separated hidden sizes")
    p.add_argument("--batch", type=int, default=8, help="softmax batch (rows = batch x heads)")
    p.add_argument("--heads", type=int, default=0, help="0: GPT-2's heads for each hidden size")
    p.add_argument("--seq", type=int, default=1024, help="softmax sequence length")
    p.add_argument("--kernels", default="layernorm,softmax")
    p.add_argument("--compile", choices=["all", "largest", "none"], default="all",
                   help="torch.compile baselines for all hidden sizes, only the largest, or none")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; pass --device cpu")
    timer = Timer(device, args.warmup, args.iters)
    copy_bw = copy_bandwidth(device, timer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}  dtype: {args.dtype}  copy bandwidth: {copy_bw:.1f} GB/s")
    if not _triton_usable(device):
        print("triton: skipped (needs CUDA or TRITON_INTERPRET=1)")
    kernels = args.kernels.split(",")
    rows: list[dict] = []
    for hidden in args.hidden:
        if "layernorm" in kernels:
            rows += bench_layernorm(args, device, dtype, hidden, timer, copy_bw)
        if "softmax" in kernels and hidden == _first_hidden_per_heads(args)[_heads(args, hidden)]:
            rows += bench_softmax(args, device, dtype, hidden, timer, copy_bw)
    add_speedups(rows)
    print(format_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": name, "dtype": args.dtype, "copy_gbps": copy_bw,
                "torch": torch.__version__, "triton": _triton_version(),
                "date": time.strftime("%Y-%m-%d"),
                "interpreted": device.type != "cuda"}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
