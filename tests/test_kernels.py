"""Fused kernels on CPU through Triton's interpreter, against the PyTorch references.

TRITON_INTERPRET is set per test by the autouse fixture below (not at import time, which would
leak into every other test in the process). That works in any import order because
megagpt2.kernels executes its kernel file on first use, once per interpreter mode
(`runtime.kernel_module`); `test_interpreter_really_ran` checks the kernels were interpreted and
`test_import_order_does_not_matter` checks a process that imported triton beforehand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megagpt2.kernels import (
    LayerNorm,
    layer_norm,
    layer_norm_ref,
    resolve_impl,
    runtime,
    scaled_masked_softmax,
    scaled_masked_softmax_ref,
)
from tests.kernel_checks import check_layer_norm_parity, check_softmax_parity, load_benchmark, rel_err

# Max error relative to the reference's largest magnitude. bf16 allows ~1 ulp (2^-7); the
# interpreter rounds fp32 -> bf16 toward zero where GPUs round to nearest, so not less.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def ln_case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(n, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def check_layer_norm(shape, dtype, seed=0):
    x, w, b, dy = ln_case(shape, dtype, seed)
    check_layer_norm_parity(x, w, b, dy, "triton", TOL[dtype], GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (7, 40), (13, 100), (2, 3, 33), (5, 64)])
def test_layer_norm_matches_reference(shape, dtype):
    # 40, 100, 33: not powers of two; 7 and 13 rows: the last backward program is partly empty.
    check_layer_norm(shape, dtype)


@settings(max_examples=8, deadline=None, derandomize=True)
# hidden >= 8: at 2 the exact dx is identically zero, so a relative error is meaningless.
@given(rows=st.integers(1, 9), hidden=st.integers(8, 80), bf16=st.booleans())
def test_layer_norm_random_shapes(rows, hidden, bf16):
    check_layer_norm((rows, hidden), torch.bfloat16 if bf16 else torch.float32, seed=rows)


def test_layer_norm_strided_input_and_fp32_params_with_bf16_input():
    big = torch.randn(6, 50, dtype=torch.bfloat16)
    x = big[:, 3:43].requires_grad_()  # rows 50 apart: the kernel takes the row stride
    w = (1 + 0.1 * torch.randn(40)).requires_grad_()  # fp32 parameters, bf16 activations
    b = (0.1 * torch.randn(40)).requires_grad_()
    dy = torch.randn(6, 40, dtype=torch.bfloat16)
    y = layer_norm(x, w, b, impl="triton")
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    assert y.dtype == gx.dtype == torch.bfloat16 and gw.dtype == gb.dtype == torch.float32
    xr = x.detach().float().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    yr = layer_norm_ref(xr, wr, br)
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.float())
    assert rel_err(y, yr) < TOL[torch.bfloat16] and rel_err(gx, rx) < GRAD_TOL[torch.bfloat16]
    assert rel_err(gw, rw) < 1e-5 and rel_err(gb, rb) < 1e-5  # fp32 sums of the same terms


def test_layer_norm_weight_grads_are_deterministic():
    x, w, b, dy = ln_case((11, 48), torch.float32)
    first = torch.autograd.grad(layer_norm(x, w, b, impl="triton"), (w, b), dy)
    again = torch.autograd.grad(layer_norm(x, w, b, impl="triton"), (w, b), dy)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_partial_sum_kernel(dtype):
    """The dw/db reduction over more partial rows than one tile, columns not filling a tile."""
    from megagpt2.kernels.layernorm import DWDB_BLOCK_C, DWDB_BLOCK_P

    p, n = 2 * DWDB_BLOCK_P + 5, DWDB_BLOCK_C + 36
    parts = torch.randn(2, p, n, generator=torch.Generator().manual_seed(3))
    dw, db = torch.full((2, n), float("nan"), dtype=dtype)  # poisoned: every column written
    runtime.kernel_module().ln_dwdb_kernel[(2,)](
        parts[0], parts[1], dw, db, p, n, BLOCK_P=DWDB_BLOCK_P, BLOCK_C=DWDB_BLOCK_C
    )
    want = parts.double().sum(dim=1)
    assert rel_err(dw.double(), want[0]) < TOL[dtype] and rel_err(db.double(), want[1]) < TOL[dtype]


def test_layer_norm_module_selects_kernel():
    ln_t, ln_r = LayerNorm(24, impl="triton"), LayerNorm(24, impl="torch")
    assert [n for n, _ in ln_t.named_parameters()] == ["weight", "bias"]
    assert torch.equal(ln_t.weight, torch.ones(24)) and torch.equal(ln_t.bias, torch.zeros(24))
    x = torch.randn(2, 5, 24)
    assert rel_err(ln_t(x), ln_r(x)) < 2e-6


def smx_case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return s, dy


def check_softmax(shape, dtype, causal, mask=None, scale=0.37, seed=0):
    s, dy = smx_case(shape, dtype, seed)
    return check_softmax_parity(s, dy, scale, causal, mask, "triton", TOL[dtype], GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 2, 5, 13), (2, 1, 1, 9), (1, 1, 16, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_matches_reference(shape, dtype, causal):
    # (5, 13) and (1, 9): Tk > Tq, the KV-cache case with an offset causal mask.
    check_softmax(shape, dtype, causal)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 11), (2, 1, 6, 11), (6, 11), (2, 3, 6, 11)])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_explicit_mask(mask_shape, causal):
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) < 0.4
    check_softmax((2, 3, 6, 11), torch.float32, causal, mask)


def test_softmax_fully_masked_rows_are_zero():
    mask = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 1, :] = True  # row 1: every key masked
    p, ds = check_softmax((2, 2, 4, 6), torch.float32, causal=False, mask=mask)
    assert torch.equal(p[:, :, 1], torch.zeros_like(p[:, :, 1]))
    assert torch.equal(ds[:, :, 1], torch.zeros_like(ds[:, :, 1]))
    # Causal with Tq > Tk: the first Tq - Tk queries see no key at all.
    p, _ = check_softmax((1, 2, 6, 4), torch.bfloat16, causal=True)
    assert torch.equal(p[:, :, :2].float(), torch.zeros(1, 2, 2, 4))
    assert torch.allclose(p[:, :, 2:].float().sum(-1), torch.ones(1, 2, 4), atol=2e-2)


def test_causal_softmax_rows_sum_to_one_and_respect_mask():
    p, _ = check_softmax((1, 2, 5, 8), torch.float32, causal=True)
    offset = 8 - 5
    for i in range(5):
        assert torch.equal(p[..., i, i + offset + 1 :], torch.zeros_like(p[..., i, i + offset + 1 :]))
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, 5), atol=1e-6)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    tq=st.integers(1, 9),
    extra=st.integers(0, 7),
    causal=st.booleans(),
    bf16=st.booleans(),
)
def test_softmax_random_shapes(b, h, tq, extra, causal, bf16):
    check_softmax((b, h, tq, tq + extra), torch.bfloat16 if bf16 else torch.float32, causal)


def test_interpreter_really_ran():
    x, w, b, _ = ln_case((3, 8), torch.float32)
    layer_norm(x, w, b, impl="triton")  # CPU tensors: only the interpreter can run this
    k = runtime.kernel_module()
    for fn in (k.ln_fwd_kernel, k.ln_bwd_kernel, k.ln_dwdb_kernel, k.softmax_fwd_kernel, k.softmax_bwd_kernel):
        assert runtime.is_interpreted(fn), fn


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, w, b, _ = ln_case((3, 8), torch.float32)
    with pytest.raises(RuntimeError, match="need CUDA or TRITON_INTERPRET=1; use model.kernels=torch"):
        layer_norm(x, w, b, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        scaled_masked_softmax(torch.randn(1, 1, 2, 2), 1.0, impl="triton")


def test_resolve_impl(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"  # no CUDA needed to decide
    assert resolve_impl("torch", torch.device("cpu")) == "torch"
    assert resolve_impl("triton", torch.device("cpu")) == "triton"  # interpreter is on here
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        resolve_impl("cuda", torch.device("cpu"))
    if not runtime.apex_available():
        with pytest.raises(RuntimeError, match="apex is not importable"):
            resolve_impl("apex", torch.device("cuda"))


def test_auto_on_cpu_uses_reference():
    x, w, b, _ = ln_case((4, 10), torch.float32)
    assert type(layer_norm(x, w, b).grad_fn).__name__ == "NativeLayerNormBackward0"


def test_reference_softmax_matches_formula():
    s = torch.randn(2, 2, 4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool).triu(6 - 4 + 1)  # the offset causal mask
    expected = torch.softmax((s * 0.5).masked_fill(mask, float("-inf")), -1)
    assert torch.allclose(scaled_masked_softmax_ref(s, 0.5, causal=True), expected, atol=1e-7)


def _load_bench():
    return load_benchmark("bench_kernels")


def test_bench_kernels_runs(tmp_path: Path):
    bench = _load_bench()
    out = tmp_path / "figures.json"
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--tokens",
            "8",
            "--hidden",
            "24",
            "--batch",
            "1",
            "--heads",
            "2",
            "--seq",
            "8",
            "--compile",
            "none",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--sweep",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    figures = json.loads(out.read_text())
    rows, sweep = figures["rows"], figures["sweep"]
    assert {(r["kernel"], r["impl"]) for r in rows} == {
        ("layernorm", "triton"),
        ("layernorm", "torch eager"),
        ("softmax", "triton"),
        ("softmax", "torch eager"),
    }
    assert all(r["fwd_bwd_ms"] > 0 and r["fwd_bwd_gbps"] > 0 and r["host_ms"] > 0 for r in rows)
    assert {r["impl"] for r in sweep if r["kernel"] == "layernorm"} == {
        "triton w2",
        "triton w4",
        "triton w8",
        "triton w16",
        "triton bwd 1/SM",
        "triton bwd 2/SM",
        "triton bwd 8/SM",
    }
    assert {r["impl"] for r in sweep if r["kernel"] == "softmax"} == {
        "triton w1",
        "triton w2",
        "triton w4",
        "triton w8",
    }
    assert all(r["speedup_vs_eager"] > 0 for r in sweep)


def _load_report():
    return load_benchmark("gpu_report")


def test_gpu_report_judges_the_targets():
    gpu_report = _load_report()

    def row(kernel, shape, impl, speedup, frac):
        return {"kernel": kernel, "shape": shape, "impl": impl, "speedup_vs_eager": speedup, "frac_copy_bw": frac}

    verdicts = gpu_report.judge(
        [
            row("layernorm", "(8192, 1600)", "triton", 1.31, 0.76),
            row("layernorm", "(8192, 768)", "triton", 1.0, 0.5),  # not a target shape
            row("layernorm", "(8192, 1600)", "torch eager", 1.0, 0.5),  # baselines are not judged
            row("softmax", "(8x12, 1024, 1024)", "triton", 2.5, 0.74),  # bandwidth short
            row("softmax", "(8x25, 1024, 1024)", "triton", 1.9, 0.9),  # speed-up short
        ]
    )
    assert [met for _, met, _ in verdicts] == [True, False, False]
    assert "1.31x, 76.0%" in verdicts[0][2]


def test_gpu_report_from_benchmark_figures(tmp_path: Path):
    bench = _load_bench()
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--tokens",
            "4",
            "--hidden",
            "1600",
            "--batch",
            "1",
            "--heads",
            "2",
            "--seq",
            "8",
            "--compile",
            "none",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--sweep",
            "--out",
            str(tmp_path / "bench_kernels_bf16.json"),
        ]
    )
    assert rc == 0
    (tmp_path / "summary.txt").write_text("bench_bf16: rc=0\n")
    assert _load_report().main([str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "bench_bf16: rc=0" in text and "Tuning sweep" in text and "| triton w16 |" in text
    # The CPU figures are far from the targets: both are judged, and missed.
    assert "MISSED: layernorm (4, 1600)" in text and "MISSED: softmax (1x2, 8, 8)" in text


def test_bench_failure_becomes_an_error_row(capsys):
    """One implementation failing (say, a compile error on the GPU) costs only its own row."""
    bench, gpu_report = _load_bench(), _load_report()

    def broken():
        raise RuntimeError("PTX compile failed\nlong traceback")

    bad = bench.measure("layernorm", "(8192, 1600)", "triton", {}, 1, 1, 1.0, broken)
    good = bench.measure("layernorm", "(8192, 1600)", "torch eager", {}, 1, 1, 1.0, lambda: (1.0, 2.0, 0.5))
    assert bad == {
        "kernel": "layernorm",
        "shape": "(8192, 1600)",
        "impl": "triton",
        "error": "RuntimeError: PTX compile failed",
    }
    assert "FAILED: RuntimeError: PTX compile failed" in capsys.readouterr().err
    bench.add_speedups([bad, good], [bad, good])
    assert good["speedup_vs_eager"] == 1.0 and "speedup_vs_eager" not in bad
    assert "FAILED: RuntimeError" in bench.format_table([bad, good])
    assert "failed: RuntimeError" in "\n".join(gpu_report.kernel_table([bad, good]))
    assert gpu_report.judge([bad]) == [
        (
            "layernorm (8192, 1600): >= 1.3x eager, >= 75% of copy bandwidth",
            False,
            "failed: RuntimeError: PTX compile failed",
        )
    ]


def test_bench_sweep_overrides_are_scoped():
    """Inside `tuned` the launch heuristics are overridden (same results), and restored after."""
    bench = _load_bench()
    from megagpt2.kernels import layernorm as layernorm_mod

    default_warps, default_programs = runtime.num_warps_for, layernorm_mod.bwd_programs
    x = torch.randn(10, 24, requires_grad=True)
    w, b = torch.ones(24, requires_grad=True), torch.zeros(24, requires_grad=True)
    with bench.tuned(warps=3, ln_bwd_per_sm=2):
        assert runtime.num_warps_for(2048) == 3
        assert layernorm_mod.bwd_programs(10, x.device) == 2  # CPU counts as one SM
        y = layer_norm(x, w, b, impl="triton")
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert runtime.num_warps_for is default_warps
    assert layernorm_mod.bwd_programs is default_programs
    ref = torch.autograd.grad(layer_norm_ref(x, w, b).sum(), (x, w, b))
    for got, want in zip((gx, gw, gb), ref):
        assert torch.allclose(got, want, atol=1e-5)


def test_kernels_compile_for_sm90_with_vector_loads(monkeypatch):
    """Compile for an H100/H200 (sm_90) without a GPU: catches errors the interpreter lets
    through and checks the loads are 128-bit vectors, as the bandwidth targets need."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (no warning)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = runtime.kernel_module()  # the compiled-mode copy: TRITON_INTERPRET is unset here
    assert not runtime.is_interpreted(k.ln_fwd_kernel)

    def ptx(fn, sig, constexprs, warps):
        # The launcher marks 16-byte aligned pointers and ints divisible by 16 the same way.
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or name in ("stride_x", "stride_y", "stride_dy", "stride_dx", "N", "Tk")
        }
        sig = {**sig, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn, sig, constexprs, aligned)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

    t = "*bf16"
    ln_fwd = dict(X=t, Y=t, W=t, B=t, Mean="*fp32", Rstd="*fp32", stride_x="i32", stride_y="i32", N="i32", eps="fp32")
    ln_bwd = dict(
        DY=t,
        X=t,
        W=t,
        Mean="*fp32",
        Rstd="*fp32",
        DX=t,
        DW_part="*fp32",
        DB_part="*fp32",
        stride_dy="i32",
        stride_x="i32",
        stride_dx="i32",
        M="i32",
        N="i32",
        rows_per_prog="i32",
    )
    ln_dwdb = dict(DW_part="*fp32", DB_part="*fp32", DW=t, DB=t, P="i32", N="i32")
    sm_fwd = dict(
        S=t,
        P=t,
        Mask="*u8",
        scale="fp32",
        Tq="i32",
        Tk="i32",
        H="i32",
        causal_offset="i32",
        sm_b="i32",
        sm_h="i32",
        sm_q="i32",
        sm_k="i32",
    )
    sm_bwd = dict(DY=t, P=t, DX=t, scale="fp32", Tq="i32", Tk="i32", causal_offset="i32")
    cases = [
        (k.ln_fwd_kernel, ln_fwd, {"BLOCK_N": 2048}, 8),
        (k.ln_bwd_kernel, ln_bwd, {"BLOCK_N": 2048}, 8),
        (k.ln_dwdb_kernel, ln_dwdb, {"BLOCK_P": 32, "BLOCK_C": 64}, 4),
        (k.softmax_fwd_kernel, sm_fwd, {"CAUSAL": True, "HAS_MASK": False, "BLOCK": 1024}, 4),
        (k.softmax_bwd_kernel, sm_bwd, {"CAUSAL": True, "BLOCK": 1024}, 4),
    ]
    for fn, sig, constexprs, warps in cases:
        code = ptx(fn, sig, constexprs, warps)
        assert "ld.global.v4" in code, f"{fn}: no 128-bit loads in the sm_90 PTX"


ORDER_SCRIPT = """
import os, torch
import triton.language  # imported with the interpreter off, as other libraries might
os.environ["TRITON_INTERPRET"] = "1"
from megagpt2.kernels import layer_norm, layer_norm_ref, scaled_masked_softmax, runtime
x = torch.randn(5, 24, requires_grad=True)
w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
y = layer_norm(x, w, b, impl="triton")
y.sum().backward()
assert (y - layer_norm_ref(x, w, b)).abs().max() < 1e-5
s = torch.randn(1, 2, 3, 5, requires_grad=True)
scaled_masked_softmax(s, 0.5, impl="triton").sum().backward()
assert runtime.is_interpreted(runtime.kernel_module().ln_fwd_kernel)
# The interpreter must leave triton able to compile afterwards in the same process.
del os.environ["TRITON_INTERPRET"]
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
k = runtime.kernel_module()
sig = dict(X="*fp32", Y="*fp32", W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32",
           stride_x="i32", stride_y="i32", N="i32", eps="fp32", BLOCK_N="constexpr")
src = ASTSource(k.ln_fwd_kernel, sig, {"BLOCK_N": 32})
assert "ld.global" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print("ORDER-OK")
"""


def test_import_order_does_not_matter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
        TRITON_DEFAULT_FP_FUSION="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ORDER_SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert "ORDER-OK" in proc.stdout, proc.stderr[-3000:]
