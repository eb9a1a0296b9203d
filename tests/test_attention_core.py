"""The three attention paths (flash, fused_softmax, torch) agree, including KV-cache offsets.

Runs on CPU (the fused path through Triton's interpreter when kernels="triton") and, unchanged,
on CUDA when one is present (gpu_check.sh runs this file there too).
"""

from __future__ import annotations

import math

import pytest
import torch

from megagpt2.kernels import causal_mask
from megagpt2.model.attention_core import PATHS, attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 1e-5 if DEVICE.type == "cpu" else 2e-3  # CUDA matmuls may use TF32


@pytest.fixture(autouse=True)
def interpreter_on_cpu(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernels="triton" on CPU tensors
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def qkv(b=2, h=3, tq=6, tk=6, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda t: torch.randn(b, h, t, d, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return make(tq), make(tk), make(tk)


def naive(q, k, v):
    """Loop over queries: query i attends keys 0 .. i + (Tk - Tq). Independent of every path."""
    tq, tk = q.shape[2], k.shape[2]
    out = []
    for i in range(tq):
        last = i + (tk - tq) + 1
        s = q[:, :, i : i + 1] @ k[:, :, :last].transpose(-2, -1) / math.sqrt(q.shape[-1])
        out.append(torch.softmax(s.float(), -1).to(q.dtype) @ v[:, :, :last])
    return torch.cat(out, dim=2)


def run(path, kernels, q, k, v, **kw):
    out = attention(q, k, v, path=path, kernels=kernels, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out, grads


def close(a, b, tol=TOL):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < tol


@pytest.mark.parametrize("tq,tk", [(6, 6), (1, 7), (3, 8), (5, 5)])
@pytest.mark.parametrize(
    "path,kernels",
    [
        ("flash", "auto"),
        ("fused_softmax", "triton"),
        ("fused_softmax", "torch"),
        ("torch", "auto"),
    ],
)
def test_paths_match_naive_attention(path, kernels, tq, tk):
    q, k, v = qkv(tq=tq, tk=tk)
    out, grads = run(path, kernels, q, k, v)
    ref, ref_grads = run("torch", "torch", q, k, v) if path != "torch" else (None, None)
    expected = naive(q, k, v)
    assert out.shape == (2, 3, tq, 8)
    assert close(out, expected)
    if ref is not None:
        for g, r in zip(grads, ref_grads):
            assert close(g, r)


def test_kv_cache_offset_matches_full_sequence():
    # The last 3 queries over all 8 keys must equal the last 3 rows of full causal attention.
    q, k, v = qkv(tq=8, tk=8, seed=3)
    for path in PATHS:
        full = attention(q, k, v, path=path, kernels="triton")
        tail = attention(q[:, :, 5:], k, v, path=path, kernels="triton")
        assert close(tail, full[:, :, 5:]), path


def left_padding_mask(tq, tk, pads):
    """(B, 1, Tq, Tk) bool, True = masked: sequence b starts with pads[b] padding keys."""
    keys = torch.arange(tk, device=DEVICE)
    return torch.stack([(keys < p).expand(tq, tk) for p in pads]).unsqueeze(1)


@pytest.mark.parametrize("tq,tk", [(6, 6), (3, 8)])
def test_padding_mask_paths_agree_and_ignore_padding(tq, tk):
    q, k, v = qkv(tq=tq, tk=tk, seed=4)
    pads = [0, 4]  # with Tq == Tk == 6, queries 0..3 of sequence 1 see only padding
    mask = left_padding_mask(tq, tk, pads)
    results = {}
    for path, kernels in [("torch", "torch"), ("fused_softmax", "triton"), ("flash", "auto")]:
        results[path] = run(path, kernels, q, k, v, mask=mask)
    ref, ref_grads = results.pop("torch")
    for path, (out, grads) in results.items():
        assert close(out, ref), path
        for g, r in zip(grads, ref_grads):
            assert torch.isfinite(g).all() and close(g, r), path
    assert torch.equal(ref[0], attention(q, k, v, "torch")[0])  # no padding: mask is a no-op
    # Padded keys must not matter: change them and the visible outputs stay the same.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, :4], v2[1, :, :4] = 9.0, -9.0
    again = attention(q, k2, v2, "fused_softmax", kernels="triton", mask=mask)
    assert close(again, ref)
    dead = (mask | causal_mask(tq, tk, DEVICE)).all(-1)  # (B, 1, Tq): queries seeing no key
    assert dead.any() == (tq == tk)
    assert torch.equal(ref.masked_fill(~dead.unsqueeze(-1), 0.0), torch.zeros_like(ref))  # zeros


def test_dropout_torch_and_fused_paths_agree_and_eval_is_deterministic():
    q, k, v = qkv(seed=1)
    outs = []
    for path in ("torch", "fused_softmax"):
        torch.manual_seed(123)
        outs.append(attention(q, k, v, path=path, kernels="triton", dropout_p=0.5, training=True))
    assert close(outs[0], outs[1])  # same probabilities, same RNG draws -> same dropout mask
    no_drop = attention(q, k, v, path="torch", kernels="torch", dropout_p=0.0, training=True)
    assert not close(outs[0], no_drop, tol=1e-3)  # dropout really applied
    for path in PATHS:  # training=False: dropout off on every path
        evald = attention(q, k, v, path=path, kernels="triton", dropout_p=0.5, training=False)
        assert close(evald, no_drop), path


def test_flash_dropout_applies_only_in_training():
    q, k, v = qkv(seed=2)
    torch.manual_seed(0)
    dropped = attention(q, k, v, path="flash", dropout_p=0.5, training=True)
    plain = attention(q, k, v, path="flash", dropout_p=0.0, training=True)
    assert not close(dropped, plain, tol=1e-3)


def test_bad_arguments_are_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention path"):
        attention(q, k, v, path="sparse", kernels="auto")
    with pytest.raises(ValueError, match="Tk >= Tq"):
        attention(q, k[:, :, :3], v[:, :, :3], path="torch", kernels="auto")
