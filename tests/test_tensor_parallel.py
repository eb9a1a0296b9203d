"""Tensor (and sequence) parallelism equals the single-device model: logits, loss, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt2.config import ModelConfig
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from megagpt2.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagpt2.parallel.layers import shard, unshard
from tests.dist_utils import run_distributed, world_groups

CFG = dict(
    n_layer=2,
    n_embd=32,
    n_head=4,
    n_positions=16,
    vocab_size=250,
    make_vocab_size_divisible_by=64,
    dropout=0.0,
    attn_dropout=0.0,
    attention="torch",
    kernels="torch",
)


def _batch(seed: int = 0, B: int = 2, T: int = 16, V: int = 250):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100  # ignored targets take part in the check too
    return idx, targets


def _forward_backward(model: GPT2, idx, targets):
    logits_local = model.logits_local(model.run_blocks(model.embed(idx))[0])
    loss = model.loss(logits_local, targets)
    loss.backward()
    return model.full_logits(logits_local).detach(), loss.detach()


def _tp_worker(rank, world, tp, sp, idx, targets):
    model = GPT2(ModelConfig(**CFG), world_groups(tp=tp), sequence_parallel=sp)
    logits, loss = _forward_backward(model, idx, targets)
    grads = {n: (p.grad.clone(), p.tp_dim, p.tp_stride) for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"logits": logits, "loss": loss, "grads": grads, "params": params}


def _gathered(results, key):
    out = {}
    for name, (_, dim, stride) in results[0]["grads"].items():
        pieces = [r[key][name][0] if key == "grads" else r[key][name] for r in results]
        out[name] = pieces[0] if dim is None else unshard(pieces, dim, stride)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_tp_matches_single_device(tp, sp):
    idx, targets = _batch()
    ref = GPT2(ModelConfig(**CFG), ProcessGroups.single())
    ref_logits, ref_loss = _forward_backward(ref, idx, targets)
    results = run_distributed(_tp_worker, tp, args=(tp, sp, idx, targets))
    params = _gathered(results, "params")
    grads = _gathered(results, "grads")
    for name, p in ref.named_parameters():  # same full weights at init, for any tp
        assert torch.equal(params[name], p.detach()), name
    for r in results:
        assert _rel(r["logits"], ref_logits) < 1e-5
        assert abs(r["loss"].item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    ref_norm = torch.sqrt(sum((p.grad**2).sum() for p in ref.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm
    for name, p in ref.named_parameters():
        assert _rel(grads[name], p.grad) < 1e-5, f"gradient of {name} differs"
        if getattr(p, "tp_dim", None) is None:  # replicated params: identical on every TP rank
            for r in results[1:]:
                assert torch.allclose(r["grads"][name][0], results[0]["grads"][name][0], rtol=1e-6, atol=1e-9)


def _ce_worker(rank, world, logits, target, real_vocab, upstream):
    groups = world_groups(tp=world)
    local = shard(logits, -1, groups.layout.tp_rank, world).clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, groups.tp, real_vocab)
    (loss * upstream).sum().backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_cross_entropy_equals_torch(tp):
    g = torch.Generator().manual_seed(1)
    V, Vp = 61, 64  # 3 padded columns: the last shard mixes real and padded entries
    logits = torch.randn(3, 5, Vp, generator=g) * 3
    target = torch.randint(0, V, (3, 5), generator=g)
    target[1, 2] = target[2, 4] = -100
    upstream = torch.rand(3, 5, generator=g)
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in[..., :V].reshape(-1, V), target.reshape(-1), reduction="none").view(3, 5)
    (ref * upstream).sum().backward()
    results = run_distributed(_ce_worker, tp, args=(logits, target, V, upstream))
    grad = unshard([r[1] for r in results], -1)
    assert torch.allclose(results[0][0], ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, ref_in.grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(grad[..., V:]) == 0  # padded logits get no gradient


def test_single_process_cross_entropy_ignores_padding():
    logits = torch.zeros(1, 2, 8)
    logits[..., 6:] = 100.0  # padded columns would dominate if they counted
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([[0, -100]]), None, real_vocab=6)
    assert torch.allclose(loss, torch.tensor([[torch.log(torch.tensor(6.0)).item(), 0.0]]))


def test_shard_unshard_stride_roundtrip():
    full = torch.arange(24.0).view(12, 2)
    pieces = [shard(full, 0, r, 2, stride=3) for r in range(2)]
    assert pieces[0][:2].tolist() == full[:2].tolist() and pieces[0][2:4].tolist() == full[4:6].tolist()
    assert torch.equal(unshard(pieces, 0, stride=3), full)


def _dropout_worker(rank, world, sp, idx):
    torch.manual_seed(7)  # the default stream: same seed on every rank, as the trainer does
    cfg = ModelConfig(**dict(CFG, dropout=0.3, attn_dropout=0.3))
    model = GPT2(cfg, world_groups(tp=world), sequence_parallel=sp, seed=7)
    model.train()
    x = model.run_blocks(model.embed(idx))[0]
    if sp:
        from megagpt2.parallel.comm import gather_from_sequence_region

        x = gather_from_sequence_region(x, model.groups.tp)
    return x.detach(), model.tracker.get_state()


@pytest.mark.parametrize("sp", [False, True])
def test_tp_dropout_streams(sp):
    """Replicated activations must agree across TP ranks (same residual-dropout masks) while each
    rank's attention-head dropout uses its own stream."""
    idx, _ = _batch()
    (x0, s0), (x1, s1) = run_distributed(_dropout_worker, 2, args=(sp, idx))
    assert torch.equal(x0, x1)  # the residual stream stays replicated despite dropout
    assert not torch.equal(s0, s1)  # per-rank streams for sharded regions
    ref = GPT2(ModelConfig(**CFG), ProcessGroups.single()).eval()
    with torch.no_grad():
        assert not torch.allclose(ref.run_blocks(ref.embed(idx))[0], x0)  # dropout did act
