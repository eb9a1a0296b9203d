"""GPT-2 as the paper defines it: Hugging Face parity, initialisation, vocabulary padding."""

from __future__ import annotations

import math

import pytest
import torch

from megagpt2.config import ModelConfig
from megagpt2.interop import from_hf_state_dict, to_hf_config, to_hf_state_dict
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups

ONE = ProcessGroups.single()  # the layout of one process: no groups

TINY = dict(
    n_layer=2,
    n_embd=64,
    n_head=4,
    n_positions=64,
    vocab_size=1000,
    dropout=0.0,
    attn_dropout=0.0,
    attention="torch",
    kernels="torch",
)


def _hf_twin(model: GPT2, cfg: ModelConfig):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(to_hf_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    hf.tie_weights()
    return hf


@pytest.mark.parametrize(
    "shape,T", [(TINY, 32), (dict(TINY, n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257), 8)]
)
def test_logits_match_transformers(shape, T):
    cfg = ModelConfig(**shape)
    ours = GPT2(cfg, ONE).eval()
    hf = _hf_twin(ours, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits
    assert a.shape == b.shape == (2, T, cfg.vocab_size)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("attention", ["flash", "fused_softmax"])
def test_attention_paths_match_reference(attention):
    ref = GPT2(ModelConfig(**TINY), ONE).eval()
    other = GPT2(ModelConfig(**dict(TINY, attention=attention)), ONE).eval()
    other.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ref(idx), other(idx), atol=1e-5, rtol=1e-5)


def test_round_trip_through_hf_is_bit_identical():
    cfg = ModelConfig(**TINY)
    ours = GPT2(cfg, ONE)
    back = from_hf_state_dict(_hf_twin(ours, cfg).state_dict(), cfg)
    sd = ours.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_initialisation_follows_the_paper():
    cfg = ModelConfig(n_layer=12, n_embd=256, n_head=4, n_positions=1024, vocab_size=50257)
    m = GPT2(cfg, ONE)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() / resid_std - 1) < 0.05, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wpe.weight")):
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
    wte = m.wte.weight
    assert abs(wte[: cfg.vocab_size].std().item() / 0.02 - 1) < 0.05
    assert torch.all(wte[cfg.vocab_size :] == 0)  # padding rows
    assert m.output_weight is m.wte.weight  # tied output projection


def test_padded_vocabulary_never_wins_nor_counts():
    cfg = ModelConfig(**TINY)  # 1000 real tokens padded to 1024
    assert cfg.padded_vocab_size == 1024
    m = GPT2(cfg, ONE).eval()
    with torch.no_grad():
        m.wte.weight[cfg.vocab_size :] = 10.0  # make the padded rows as attractive as possible
        idx = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
        logits = m(idx)
        assert logits.shape[-1] == cfg.vocab_size
        loss = m(idx, idx)
        ref = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), idx.view(-1))
    assert torch.allclose(loss, ref, atol=1e-5)


def test_dropout_is_configurable_and_off_in_eval():
    cfg = ModelConfig(**dict(TINY, dropout=0.5, attn_dropout=0.5))
    m = GPT2(cfg, ONE)
    idx = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
    m.train()
    assert not torch.equal(m(idx), m(idx))
    m.eval()
    assert torch.equal(m(idx), m(idx))


def test_activation_checkpointing_gives_same_gradients():
    base = GPT2(ModelConfig(**TINY), ONE)
    ckpt = GPT2(ModelConfig(**dict(TINY, activation_checkpointing=True)), ONE)
    ckpt.load_state_dict(base.state_dict())
    idx = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    base(idx, idx).backward()
    ckpt(idx, idx).backward()
    for (n, a), (_, b) in zip(base.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7), n
