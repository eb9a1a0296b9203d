"""`model.compile: true` computes what eager does: loss, gradients and training steps within 1e-5.

Compiling costs real time on 2 cores (inductor builds C++ kernels), so there are two compiles
only: the whole model (the default path) checked op by op, and the per-block path under
activation checkpointing checked end to end through the Trainer (DeepSpeed, ZeRO-2).
"""

from __future__ import annotations

import copy

import pytest
import torch

from megagpt2.config import ModelConfig
from megagpt2.model import GPT2
from megagpt2.model.compile import compile_model
from megagpt2.parallel import ProcessGroups
from tests.dist_utils import run_distributed
from tests.train_utils import ds_config, losses, make_dataset, tiny_config, train_worker

TINY = dict(
    n_layer=2,
    n_embd=32,
    n_head=4,
    n_positions=16,
    vocab_size=250,
    make_vocab_size_divisible_by=64,
    dropout=0.0,
    attn_dropout=0.0,
    attention="flash",
    kernels="torch",
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def test_compiled_model_matches_eager_loss_and_gradients():
    from torch._dynamo.utils import counters

    eager = GPT2(ModelConfig(**TINY), ProcessGroups.single())
    compiled = compile_model(copy.deepcopy(eager), activation_checkpointing=False)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged: checkpoints still load
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 250, (2, 16), generator=g), torch.randint(0, 250, (2, 16), generator=g)
    graphs_before = counters["stats"]["unique_graphs"]
    a, b = eager(idx, tgt), compiled(idx, tgt)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo really compiled something
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert q.grad is not None, name
        assert _rel(q.grad, p.grad) < 1e-5, (name, _rel(q.grad, p.grad))


def record_compiled_graphs(trainer) -> None:
    """Trainer patch: every record also says whether block 0 is compiled and how many graphs exist."""
    from torch._dynamo.utils import counters

    inner = trainer._record
    compiled = trainer.model.h["0"]._compiled_call_impl is not None

    def record(**values):
        inner(**values, compiled=compiled, graphs=counters["stats"]["unique_graphs"])

    trainer._record = record


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_trainer_compiled_blocks_under_checkpointing_match_eager(data_prefix):
    cfg = tiny_config(data_prefix, None, steps=3, model={"activation_checkpointing": True})
    eager = run_distributed(train_worker, 1, args=(cfg.to_dict(), ds_config(stage=2, micro=4), {}))[0]
    cfg.model.compile = True
    comp = run_distributed(
        train_worker,
        1,
        args=(cfg.to_dict(), ds_config(stage=2, micro=4), {}, True, record_compiled_graphs),
        timeout=900,
    )[0]
    steps = [r for r in comp["records"] if "loss" in r]
    assert steps and all(r["compiled"] for r in steps)
    # One graph for the block, shared by both blocks (plus at most a few for what runs outside it).
    assert 1 <= steps[-1]["graphs"] <= 3, steps[-1]["graphs"]
    ref, got = losses(eager), losses(comp)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref)
    norms = [[r["grad_norm"] for r in res["records"] if "grad_norm" in r] for res in (eager, comp)]
    assert len(norms[0]) == 3 and all(abs(a - b) <= 1e-5 * b for a, b in zip(*norms)), norms
    # Parameters after 3 AdamW steps: Adam divides by sqrt(v), so it magnifies rounding where a
    # gradient is nearly zero. The key bias's gradient is zero in exact arithmetic (softmax does
    # not change when every score of a query moves by q . b_k), so there both paths step on
    # rounding noise alone: it is left out; everything else must agree to 5e-5.
    C = cfg.model.n_embd
    for name, (p, _, _) in eager["params"].items():
        q = comp["params"][name][0]
        if name.endswith("attn.c_attn.bias"):
            p, q = torch.cat([p[:C], p[2 * C :]]), torch.cat([q[:C], q[2 * C :]])
        assert _rel(q, p) < 5e-5, (name, _rel(q, p))
