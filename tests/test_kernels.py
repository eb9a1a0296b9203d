"""Fused kernels on CPU through Triton's interpreter, against the PyTorch references.

TRITON_INTERPRET is set per test by the autouse fixture below (not at import time, which would
leak into every other test in the process). That works in any import order because
megagpt2.kernels decorates its Triton kernels on first use, once per interpreter mode
(`runtime.jit`); `test_interpreter_really_ran` checks the kernels were interpreted.
"""
from __future__ import annotations

import importlib.util
import json
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
    scaled_masked_softmax,
    scaled_masked_softmax_ref,
)
from megagpt2.kernels import runtime

# Max error relative to the reference's largest magnitude. bf16 allows ~1 ulp (2^-7); the
# interpreter rounds fp32 -> bf16 toward zero where GPUs round to nearest, so not less.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (scale-free, so one tolerance fits all shapes)."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), "non-finite values in kernel output"
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()


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
    y = layer_norm(x, w, b, 1e-5, impl="triton")
    assert type(y.grad_fn).__name__ == "TritonLayerNormBackward"  # the Triton path really ran
    assert y.dtype == dtype and y.shape == x.shape
    grads = torch.autograd.grad(y, (x, w, b), dy)
    # Reference in fp32 on the same (already rounded) inputs: the kernel's own arithmetic.
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    yr = layer_norm_ref(xr, wr, br, 1e-5)
    ref_grads = torch.autograd.grad(yr, (xr, wr, br), dy.float())
    assert rel_err(y, yr) < TOL[dtype]
    for name, g, r in zip(("dx", "dw", "db"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, r) < GRAD_TOL[dtype], name


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


def test_layer_norm_weight_grads_are_deterministic():
    x, w, b, dy = ln_case((11, 48), torch.float32)
    first = torch.autograd.grad(layer_norm(x, w, b, impl="triton"), (w, b), dy)
    again = torch.autograd.grad(layer_norm(x, w, b, impl="triton"), (w, b), dy)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


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
    p = scaled_masked_softmax(s, scale, causal, mask, impl="triton")
    assert type(p.grad_fn).__name__ == "TritonScaledMaskedSoftmaxBackward"
    assert p.dtype == dtype and p.shape == s.shape
    (ds,) = torch.autograd.grad(p, s, dy)
    sr = s.detach().float().requires_grad_()
    pr = scaled_masked_softmax_ref(sr, scale, causal, mask)
    (dsr,) = torch.autograd.grad(pr, sr, dy.float())
    assert rel_err(p, pr) < TOL[dtype]
    assert rel_err(ds, dsr) < GRAD_TOL[dtype]
    return p, ds


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
        assert torch.equal(p[..., i, i + offset + 1:], torch.zeros_like(p[..., i, i + offset + 1:]))
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, 5), atol=1e-6)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h=st.integers(1, 3), tq=st.integers(1, 9), extra=st.integers(0, 7),
       causal=st.booleans(), bf16=st.booleans())
def test_softmax_random_shapes(b, h, tq, extra, causal, bf16):
    check_softmax((b, h, tq, tq + extra), torch.bfloat16 if bf16 else torch.float32, causal)


def test_interpreter_really_ran():
    from megagpt2.kernels import _layernorm_kernels, _softmax_kernels

    x, w, b, _ = ln_case((3, 8), torch.float32)
    layer_norm(x, w, b, impl="triton")  # CPU tensors: only the interpreter can run this
    for fn in (_layernorm_kernels.ln_fwd_kernel, _layernorm_kernels.ln_bwd_kernel,
               _softmax_kernels.softmax_fwd_kernel, _softmax_kernels.softmax_bwd_kernel):
        assert runtime.is_interpreted(runtime.jit(fn)), fn.__name__


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


def test_bench_kernels_runs(tmp_path: Path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "figures.json"
    rc = bench.main(["--device", "cpu", "--dtype", "fp32", "--tokens", "8", "--hidden", "24",
                     "--batch", "1", "--heads", "2", "--seq", "8", "--compile", "none",
                     "--warmup", "0", "--iters", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernel"], r["impl"]) for r in rows} == {
        ("layernorm", "triton"), ("layernorm", "torch eager"),
        ("softmax", "triton"), ("softmax", "torch eager"),
    }
    assert all(r["fwd_bwd_ms"] > 0 and r["fwd_bwd_gbps"] > 0 for r in rows)
