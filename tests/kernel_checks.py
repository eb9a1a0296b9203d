"""Parity checks shared by the kernel tests (CPU interpreter and CUDA) and a benchmark loader.

Each check runs the kernel path, asserts the Triton autograd Function really ran, and compares
output and gradients with the PyTorch reference run in fp32 on the same (already rounded) inputs,
so the tolerance measures the kernel's own arithmetic. Errors are scale-free: max |a - e| / max |e|.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from megagpt2.kernels import layer_norm, layer_norm_ref, scaled_masked_softmax, scaled_masked_softmax_ref


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (scale-free, so one tolerance fits all shapes)."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), "non-finite values in kernel output"
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()


def check_layer_norm_parity(x, w, b, dy, impl: str, tol: float, grad_tol: float):
    """LayerNorm through `impl` (which must pick Triton) against the fp32 reference -> (y, grads)."""
    y = layer_norm(x, w, b, 1e-5, impl=impl)
    assert type(y.grad_fn).__name__ == "TritonLayerNormBackward"  # the Triton path really ran
    assert y.dtype == x.dtype and y.shape == x.shape
    grads = torch.autograd.grad(y, (x, w, b), dy)
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    yr = layer_norm_ref(xr, wr, br, 1e-5)
    ref_grads = torch.autograd.grad(yr, (xr, wr, br), dy.float())
    assert rel_err(y, yr) < tol
    for name, g, r in zip(("dx", "dw", "db"), grads, ref_grads):
        assert g.dtype == x.dtype, name
        assert rel_err(g, r) < grad_tol, name
    return y, grads


def check_softmax_parity(s, dy, scale: float, causal: bool, mask, impl: str, tol: float, grad_tol: float):
    """Scaled masked softmax through `impl` (Triton) against the fp32 reference -> (p, ds)."""
    p = scaled_masked_softmax(s, scale, causal, mask, impl=impl)
    assert type(p.grad_fn).__name__ == "TritonScaledMaskedSoftmaxBackward"
    assert p.dtype == s.dtype and p.shape == s.shape
    (ds,) = torch.autograd.grad(p, s, dy)
    sr = s.detach().float().requires_grad_()
    pr = scaled_masked_softmax_ref(sr, scale, causal, mask)
    (dsr,) = torch.autograd.grad(pr, sr, dy.float())
    assert rel_err(p, pr) < tol
    assert rel_err(ds, dsr) < grad_tol
    return p, ds


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) loaded as a fresh module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
