"""One tiny trained model shared by the evaluation and export tests (session scope).

`trained` trains a 2-layer, 32-wide GPT-2 (GPT-2 vocabulary, 128 positions) for a few dozen
steps on text in the layouts the evaluation tasks prompt with (Q:/A: pairs, `english = french`
lines, stories followed by TL;DR:), saves it as a megagpt2 checkpoint sharded for tp=2 (any
layout loads it) and exports that with `tools/convert_checkpoint.py --to hf`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "apple river stone music garden window silver morning winter candle forest letter quiet "
    "bright journey ocean mountain paper yellow whisper"
).split()
FRENCH = (
    "pomme rivière pierre musique jardin fenêtre argent matin hiver bougie forêt lettre calme "
    "clair voyage océan montagne papier jaune murmure"
).split()


def corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Short documents in the tasks' layouts, so greedy output has newlines and task words."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randrange(3, 7)
        idx = [rng.randrange(len(WORDS)) for _ in range(k)]
        en, fr = " ".join(WORDS[j] for j in idx), " ".join(FRENCH[j] for j in idx)
        kind = i % 3
        if kind == 0:
            docs.append(f"Q: what is the {WORDS[idx[0]]}?\nA: the {WORDS[idx[1]]}\n")
        elif kind == 1:
            docs.append(f"{en} = {fr}\n")
        else:
            docs.append(f"The {en} was {WORDS[idx[-1]]}. It was {WORDS[idx[0]]}.\nTL;DR: {en}.\n")
    return docs


def train_tiny(steps: int = 80, seed: int = 0):
    """(model, tokenizer): a plain torch loop, one process."""
    from megagpt2.config import Config
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups
    from megagpt2.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = Config().model
    cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size = 2, 32, 4, 128, tok.vocab_size
    cfg.dropout = cfg.attn_dropout = 0.0
    cfg.attention, cfg.kernels = "torch", "torch"
    model = GPT2(cfg, ProcessGroups.single(), seed=seed)
    stream = []
    for doc in corpus(seed):
        stream += tok.encode(doc) + [tok.eod]
    # softmax over the corpus' own tokens only (a few dozen of 50257): 100x cheaper per step, and
    # the tokens it never saw keep near-zero logits, far below the trained ones
    used = torch.tensor(sorted(set(stream)))
    remap = torch.full((tok.vocab_size,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    data = torch.tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(seed)
    T, B = 48, 12
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        h = model.ln_f(model.run_blocks(model.embed(x))[0])  # (B, T, C)
        logits = h @ model.output_weight[used].t()  # (B, T, |used|)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), remap[y].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """{"ckpt": megagpt2 checkpoint (tp=2 shards), "hf": its --to hf export, "model", "tok"}."""
    from megagpt2.checkpoint.reshard import default_sharding, write_converted
    from megagpt2.config import Config
    from tools import convert_checkpoint

    torch.manual_seed(0)
    model, tok = train_tiny()
    root: Path = tmp_path_factory.mktemp("trained")
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = Config()
    cfg.model = model.cfg
    meta = {"config": cfg.to_dict(), "tokenizer": tok.identity(), "step": 80}
    write_converted(full, default_sharding(full), meta, str(root / "ckpt"), tp=2)
    assert convert_checkpoint.main(["--input", str(root / "ckpt"), "--output", str(root / "hf"), "--to", "hf"]) == 0
    return {"ckpt": str(root / "ckpt"), "hf": str(root / "hf"), "model": model, "tok": tok, "root": root}
