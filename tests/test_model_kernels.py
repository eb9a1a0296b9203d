"""A tiny GPT-2 on the Triton kernels (CPU interpreter) equals the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megagpt2.config import ModelConfig
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from tests.kernel_checks import load_benchmark

CFG = dict(
    n_layer=2,
    n_embd=48,
    n_head=3,
    n_positions=32,
    vocab_size=300,
    make_vocab_size_divisible_by=64,
    dropout=0.0,
    attn_dropout=0.0,
)


@pytest.mark.parametrize("attention", ["fused_softmax", "flash"])
def test_triton_kernels_give_same_loss_and_gradients(monkeypatch, attention):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref = GPT2(ModelConfig(**CFG, attention="torch", kernels="torch"), ProcessGroups.single())
    tri = GPT2(ModelConfig(**CFG, attention=attention, kernels="triton"), ProcessGroups.single())
    tri.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 300, (2, 20), generator=g), torch.randint(0, 300, (2, 20), generator=g)
    a, b = ref(idx, tgt), tri(idx, tgt)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())
    for (name, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
        err = ((p.grad - q.grad).norm() / p.grad.norm().clamp(min=1e-12)).item()
        assert err < 1e-5, (name, err)


def test_bench_model_paths_agree(monkeypatch, tmp_path):
    """benchmarks/bench_model.py runs every kernels x attention pair; with dropout off their
    first losses agree (same weights, same tokens), so the benchmark compares like with like."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bench = _load_bench_model()
    out = tmp_path / "model.json"
    assert bench.main(TINY_BENCH_ARGS + ["--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernels"], r["attention"]) for r in rows} == {
        (k, a) for k in ("torch", "triton") for a in ("torch", "fused_softmax", "flash")
    }
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_bench_model_failure_costs_only_its_row(tmp_path, capsys):
    bench = _load_bench_model()
    timed = bench.time_model

    def flaky(model, idx, tgt, timer):
        if model.cfg.attention == "flash":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return timed(model, idx, tgt, timer)

    bench.time_model = flaky
    out = tmp_path / "model.json"
    assert bench.main(TINY_BENCH_ARGS + ["--out", str(out)]) == 0
    rows = {r["attention"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["flash"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert rows["torch"]["speedup"] == 1.0 and rows["fused_softmax"]["ms"] > 0
    assert "torch    flash          FAILED: OutOfMemoryError" in capsys.readouterr().out


TINY_BENCH_ARGS = [
    "--device",
    "cpu",
    "--config",
    str(Path(__file__).resolve().parents[1] / "configs/gpt2/tiny.yaml"),
    "--dtype",
    "fp32",
    "--micro-batch",
    "1",
    "--seq",
    "16",
    "--no-dropout",
    "--warmup",
    "0",
    "--iters",
    "1",
]


def _load_bench_model():
    return load_benchmark("bench_model")
