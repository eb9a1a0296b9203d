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
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from megagpt2.kernels import causal_mask, layer_norm, runtime, scaled_masked_softmax  # noqa: E402
from megagpt2.kernels import layernorm as layernorm_mod  # noqa: E402
from megagpt2.kernels.runtime import apex_available, interpret_enabled  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class Timer:
    """Median time of fn() in ms: kernel time on CUDA, wall time elsewhere.

    CUDA: CUDA events around each call, the L2 flushed before it, and the host's launch work
    kept out of the figure. At these sizes a call's kernels take tens of microseconds, less than
    the Python and launch work that queues them, so timing the queue as it fills would measure
    the host. A GPU spin (`torch.cuda._sleep`) queued ahead of each call, longer than the host
    needs to queue it, lets the events time the kernels back to back, as they run in training,
    where the host runs ahead of the GPU. The host's own time per call is kept in `host_ms`.
    """

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"
        # Bigger than any L2 (H200: 60 MB) so each timed call starts from HBM, like in training.
        self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None
        self.can_spin = self.cuda and hasattr(torch.cuda, "_sleep")
        self._cycles_per_ms: float | None = None
        self.host_ms = float("nan")  # host time to issue the last timed fn (median)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = [self._wall_ms(fn) for _ in range(self.iters)]
            self.host_ms = _median(times)
            return self.host_ms
        torch.cuda.synchronize(self.device)
        host = []
        for _ in range(3):  # what the host needs to queue one call, with the GPU idle
            host.append(self._wall_ms(fn))
            torch.cuda.synchronize(self.device)
        self.host_ms = _median(host)
        spin = self._spin_cycles(2 * max(host) + 0.05)
        events = []
        for _ in range(self.iters):
            if spin:
                torch.cuda._sleep(spin)
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return _median([s.elapsed_time(e) for s, e in events])

    @staticmethod
    def _wall_ms(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def _spin_cycles(self, ms: float) -> int:
        """GPU clock cycles that `torch.cuda._sleep` needs to spin for about `ms` ms (0: no spin)."""
        if not self.can_spin:
            return 0
        if self._cycles_per_ms is None:
            probe = 1 << 22
            for _ in range(2):  # the first spin also pays for loading the kernel
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(probe)
                end.record()
                torch.cuda.synchronize(self.device)
                self._cycles_per_ms = probe / max(start.elapsed_time(end), 1e-3)
        return int(min(ms, 50.0) * self._cycles_per_ms)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Device copy bandwidth in GB/s: bytes read + written by dst.copy_(src), 1 GiB on CUDA."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def fwd_and_fwdbwd(op: Callable, inputs: list[torch.Tensor], dy: torch.Tensor, timer: Timer):
    """(fwd ms, fwd+bwd ms, host ms to issue fwd+bwd).

    bwd runs through autograd.grad, so no .grad accumulation is timed.
    """

    def fwd():
        return op(*inputs)

    def fwd_bwd():
        torch.autograd.grad(op(*inputs), inputs, dy)

    f_ms = timer(fwd)
    fb_ms = timer(fwd_bwd)
    return f_ms, fb_ms, timer.host_ms


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


@contextlib.contextmanager
def tuned(warps: int | None = None, ln_bwd_per_sm: int | None = None) -> Iterator[None]:
    """Override the kernels' launch heuristics for a sweep: warps per program for every kernel,
    LayerNorm backward programs per SM. Restored on exit."""
    saved = runtime.num_warps_for, layernorm_mod.bwd_programs
    if warps is not None:
        runtime.num_warps_for = lambda block: warps
    if ln_bwd_per_sm is not None:

        def programs(rows: int, device: torch.device) -> int:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if (device.type == "cuda") else 1
            return max(1, min(rows, ln_bwd_per_sm * sms))

        layernorm_mod.bwd_programs = programs
    try:
        yield
    finally:
        runtime.num_warps_for, layernorm_mod.bwd_programs = saved


Variants = dict[str, tuple[Callable, dict]]  # label -> (op, overrides for `tuned`)


def layernorm_sweep() -> Variants:
    """The Triton LayerNorm with other warps (default: block // 256) and backward program counts."""
    op = lambda x, w, b: layer_norm(x, w, b, 1e-5, impl="triton")  # noqa: E731
    variants: Variants = {f"triton w{w}": (op, {"warps": w}) for w in (2, 4, 8, 16)}
    variants.update({f"triton bwd {k}/SM": (op, {"ln_bwd_per_sm": k}) for k in (1, 2, 8)})
    return variants


def softmax_sweep(scale: float) -> Variants:
    """The Triton softmax with other warps (default: block // 256, at most 8)."""
    op = lambda s: scaled_masked_softmax(s, scale, True, impl="triton")  # noqa: E731
    return {f"triton w{w}": (op, {"warps": w}) for w in (1, 2, 4, 8)}


def bench_layernorm(args, device, dtype, hidden: int, timer: Timer, copy_bw: float, sweep: bool = False) -> list[dict]:
    m, n, e = args.tokens, hidden, torch.finfo(dtype).bits // 8
    x = torch.randn(m, n, dtype=dtype, device=device, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    dy = torch.randn_like(x)
    fwd_bytes = 2 * m * n * e + 2 * n * e + 8 * m
    bwd_bytes = 3 * m * n * e + 8 * m + 3 * n * e
    if sweep:
        variants = layernorm_sweep()
    else:
        variants = {
            name: (op, {})
            for name, op in layernorm_impls(args, device).items()
            if not _skip_compile(args, name, hidden)
        }
    return [
        measure(
            "layernorm",
            f"({m}, {n})",
            name,
            overrides,
            fwd_bytes,
            bwd_bytes,
            copy_bw,
            lambda: fwd_and_fwdbwd(op, [x, w, b], dy, timer),
        )
        for name, (op, overrides) in variants.items()
    ]


def _skip_compile(args, name: str, hidden: int) -> bool:
    return name == "torch.compile" and args.compile == "largest" and hidden != max(args.hidden)


def _heads(args, hidden: int) -> int:
    return args.heads or GPT2_HEADS.get(hidden, max(1, hidden // 64))


def _first_hidden_per_heads(args) -> dict[int, int]:
    """Softmax shapes depend on heads only: bench each distinct head count once."""
    first: dict[int, int] = {}
    for hidden in args.hidden:
        first.setdefault(_heads(args, hidden), hidden)
    return first


def bench_softmax(args, device, dtype, hidden: int, timer: Timer, copy_bw: float, sweep: bool = False) -> list[dict]:
    heads = _heads(args, hidden)
    bh, t, e = args.batch * heads, args.seq, torch.finfo(dtype).bits // 8
    scores = torch.randn(args.batch, heads, t, t, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn_like(scores)
    mask = causal_mask(t, t, device)
    live = bh * t * (t + 1) // 2  # unmasked elements of a square causal softmax
    fwd_bytes = live * e + bh * t * t * e
    bwd_bytes = 2 * live * e + bh * t * t * e
    scale = 1.0 / math.sqrt(64)
    if sweep:
        variants = softmax_sweep(scale)
    else:
        variants = {
            name: (op, {})
            for name, op in softmax_impls(args, device, mask, scale).items()
            if not _skip_compile(args, name, hidden)
        }
    shape = f"({args.batch}x{heads}, {t}, {t})"
    return [
        measure(
            "softmax",
            shape,
            name,
            overrides,
            fwd_bytes,
            bwd_bytes,
            copy_bw,
            lambda: fwd_and_fwdbwd(op, [scores], dy, timer),
        )
        for name, (op, overrides) in variants.items()
    ]


def measure(kernel, shape, impl, overrides, fwd_bytes, bwd_bytes, copy_bw, run) -> dict:
    """One table row from run() -> (fwd ms, fwd+bwd ms, host ms), under `tuned(**overrides)`.

    A failure (a compile error, out of memory) becomes a row with "error" set and is printed, so
    one broken implementation on a lent GPU does not cost the other figures of the run.
    """
    try:
        with tuned(**overrides):
            times = run()
    except Exception as e:  # noqa: BLE001 - reported in the row and on stderr
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"{kernel} {shape} {impl}: FAILED: {error}", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"kernel": kernel, "shape": shape, "impl": impl, "error": error}
    return _row(kernel, shape, impl, *times, fwd_bytes, bwd_bytes, copy_bw)


def _row(kernel, shape, impl, f_ms, fb_ms, host_ms, fwd_bytes, bwd_bytes, copy_bw) -> dict:
    gbps = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")  # noqa: E731
    b_ms = max(fb_ms - f_ms, 0.0)
    total = gbps(fwd_bytes + bwd_bytes, fb_ms)
    return {
        "kernel": kernel,
        "shape": shape,
        "impl": impl,
        "fwd_ms": f_ms,
        "bwd_ms": b_ms,
        "fwd_bwd_ms": fb_ms,
        "host_ms": host_ms,
        "fwd_gbps": gbps(fwd_bytes, f_ms),
        "bwd_gbps": gbps(bwd_bytes, b_ms),
        "fwd_bwd_gbps": total,
        "frac_copy_bw": total / copy_bw,
        "fwd_bytes": fwd_bytes,
        "bwd_bytes": bwd_bytes,
    }


def add_speedups(rows: list[dict], baselines: list[dict]) -> None:
    """speedup = torch eager fwd+bwd time (from `baselines`) / this row's, same kernel and shape."""
    eager = {
        (r["kernel"], r["shape"]): r["fwd_bwd_ms"] for r in baselines if r["impl"] == "torch eager" and "error" not in r
    }
    for r in rows:
        if "error" in r:
            continue
        base = eager.get((r["kernel"], r["shape"]))
        r["speedup_vs_eager"] = base / r["fwd_bwd_ms"] if base else float("nan")


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'kernel':<10} {'shape':<21} {'impl':<17} {'fwd ms':>8} {'GB/s':>7} {'bwd ms':>8} "
        f"{'GB/s':>7} {'f+b ms':>8} {'GB/s':>7} {'% copy':>7} {'vs eager':>8} {'host ms':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<10} {r['shape']:<21} {r['impl']:<17} FAILED: {r['error'][:70]}")
            continue
        lines.append(
            f"{r['kernel']:<10} {r['shape']:<21} {r['impl']:<17} {r['fwd_ms']:8.3f} "
            f"{r['fwd_gbps']:7.0f} {r['bwd_ms']:8.3f} {r['bwd_gbps']:7.0f} {r['fwd_bwd_ms']:8.3f} "
            f"{r['fwd_bwd_gbps']:7.0f} {100 * r['frac_copy_bw']:6.1f}% {r['speedup_vs_eager']:7.2f}x "
            f"{r['host_ms']:8.3f}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, default=8192, help="LayerNorm rows (batch x seq)")
    p.add_argument(
        "--hidden",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[768, 1024, 1280, 1600],
        help="comma-separated hidden sizes",
    )
    p.add_argument("--batch", type=int, default=8, help="softmax batch (rows = batch x heads)")
    p.add_argument("--heads", type=int, default=0, help="0: GPT-2's heads for each hidden size")
    p.add_argument("--seq", type=int, default=1024, help="softmax sequence length")
    p.add_argument("--kernels", default="layernorm,softmax")
    p.add_argument(
        "--compile",
        choices=["all", "largest", "none"],
        default="all",
        help="torch.compile baselines for all hidden sizes, only the largest, or none",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also time the Triton kernels at the largest shapes with other warps per "
        "program and LayerNorm backward program counts (tuning data)",
    )
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
    add_speedups(rows, rows)
    print(format_table(rows))
    sweep: list[dict] = []
    if args.sweep and _triton_usable(device):
        if "layernorm" in kernels:
            sweep += bench_layernorm(args, device, dtype, max(args.hidden), timer, copy_bw, True)
        if "softmax" in kernels:
            widest = max(args.hidden, key=lambda h: _heads(args, h))
            sweep += bench_softmax(args, device, dtype, widest, timer, copy_bw, True)
        add_speedups(sweep, rows)
        print("\ntuning sweep (Triton only; wN = N warps per program, bwd k/SM = LayerNorm backward programs per SM)")
        print(format_table(sweep))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": name,
            "dtype": args.dtype,
            "copy_gbps": copy_bw,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "date": time.strftime("%Y-%m-%d"),
            "interpreted": device.type != "cuda",
            "timing": "kernel time, host launch work hidden" if timer.can_spin else "wall",
        }
        figures = {"meta": meta, "rows": rows, "sweep": sweep}
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
