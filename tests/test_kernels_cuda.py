"""Fused kernels compiled for a CUDA GPU at GPT-2 shapes, in bf16, fp16 and fp32.

Skipped without a GPU. The autouse fixture removes TRITON_INTERPRET so these tests exercise the
compiled kernels even when the environment enables the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from megagpt2.kernels import layer_norm, runtime
from megagpt2.model.attention_core import attention
from tests.kernel_checks import check_layer_norm_parity, check_softmax_parity, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Max error relative to the reference's largest magnitude: ~1 ulp of the output dtype.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
TOKENS = 8192


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def ln_inputs(m, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (2 * torch.randn(m, n, generator=g, device="cuda") + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(n, generator=g, device="cuda")).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(n, generator=g, device="cuda")).to(dtype).requires_grad_()
    dy = torch.randn(m, n, generator=g, device="cuda").to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 1280, 1600, 1000, 4097])
def test_layer_norm_gpt2_shapes(hidden, dtype):
    x, w, b, dy = ln_inputs(TOKENS if hidden != 4097 else 1031, hidden, dtype)
    check_layer_norm_parity(x, w, b, dy, "auto", TOL[dtype], GRAD_TOL[dtype])


def test_kernels_are_compiled_not_interpreted():
    x, w, b, _ = ln_inputs(4, 64, torch.float32)
    layer_norm(x, w, b, impl="triton")
    assert not runtime.is_interpreted(runtime.kernel_module().ln_fwd_kernel)


def test_layer_norm_weight_grads_are_deterministic():
    x, w, b, dy = ln_inputs(TOKENS, 1600, torch.bfloat16)
    runs = [torch.autograd.grad(layer_norm(x, w, b, impl="triton"), (w, b), dy) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


def check_softmax(shape, dtype, causal=True, mask=None, scale=0.125):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (4 * torch.randn(shape, generator=g, device="cuda")).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    p, _ = check_softmax_parity(s, dy, scale, causal, mask, "auto", TOL[dtype], GRAD_TOL[dtype])
    return p


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax_gpt2_shape(dtype):
    check_softmax((8, 12, 1024, 1024), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_softmax_padding_mask_kv_cache_and_odd_lengths(dtype):
    pad = torch.zeros(4, 1, 1, 1000, dtype=torch.bool, device="cuda")
    pad[1, ..., 900:] = True
    pad[2] = True  # a fully padded sequence: its rows must be zeros
    p = check_softmax((4, 12, 1000, 1000), dtype, causal=True, mask=pad)
    assert torch.equal(p[2], torch.zeros_like(p[2]))
    check_softmax((4, 12, 1, 1024), dtype)  # one decoding step over a 1024-key cache
    check_softmax((4, 12, 77, 1024), dtype, causal=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_paths_agree_at_gpt2_shape(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 12, 1024, 64, generator=g, device="cuda").to(dtype) for _ in range(3))
    ref = attention(q.float(), k.float(), v.float(), path="torch", kernels="torch")
    for path in ("flash", "fused_softmax", "torch"):
        out = attention(q, k, v, path=path, kernels="auto")
        assert rel_err(out, ref) < 2e-2, path
