"""A plain single-file GPT-2 in PyTorch: the reference megagpt2's speed is measured against.

Written for the benchmarks in the style of nanoGPT's model.py and train.py: nn.Linear and
nn.LayerNorm, torch's scaled_dot_product_attention (causal), the output head tied to the token
embedding, AdamW with torch's fused kernel, bf16 autocast on CUDA with fp32 weights. No
tensor or pipeline parallelism, no DeepSpeed, nothing imported from megagpt2.

Parameter names are megagpt2's (`wte.weight`, `h.3.attn.c_attn.weight`, `ln_f.bias`, ...), and
the vocabulary is padded the same way (nanoGPT's 50304), so a megagpt2 state dict loads as is
and both start from the same weights. One difference stays, as in nanoGPT: the padding logits
take part in the softmax (megagpt2 masks them), which moves the first loss by about
log(50304 / 50257) = 0.001 nats.

As a script it is the "plain script" of the launch-to-first-step comparison (bench_train.py
--launch): read a megagpt2/Megatron .bin token file, train, print one line per step.

    python benchmarks/plain_gpt2.py --data data/demo/corpus_text_document.bin --steps 5 \
        --n-layer 4 --n-embd 128 --n-head 4 --seq 128 --batch 8
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PlainConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50304  # padded: a multiple of 128
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, D)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets (B, T) -> mean cross-entropy."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V), head tied to the embedding
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8, fused: bool = True
) -> torch.optim.AdamW:
    """nanoGPT's optimizer: weight decay on matrices only, torch's fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, grad_clip: float = 1.0
) -> torch.Tensor:
    """One optimizer step (bf16 autocast on CUDA); returns the loss, still on the device."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
        loss = model(x, y)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def main(argv=None) -> int:
    """Train on a .bin token file (uint16, as tools/preprocess_data.py writes) like nanoGPT's train.py."""
    import numpy as np

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data", required=True, help="a .bin token file (uint16)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = np.memmap(args.data, dtype=np.uint16, mode="r")
    cfg = PlainConfig(args.n_layer, args.n_head, args.n_embd, n_positions=args.seq)
    model = PlainGPT(cfg).to(device)
    opt = adamw(model, args.lr, fused=True)
    step_fn = cast(nn.Module, torch.compile(model)) if args.compile else model  # an OptimizedModule
    gen = np.random.default_rng(0)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        ix = gen.integers(0, len(tokens) - args.seq - 1, args.batch)
        batch = torch.from_numpy(np.stack([tokens[i : i + args.seq + 1].astype(np.int64) for i in ix])).to(device)
        loss = train_step(step_fn, opt, batch[:, :-1], batch[:, 1:])
        print(f"step {step} | loss {loss.item():.4f} | {time.perf_counter() - t0:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
