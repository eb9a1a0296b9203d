"""The DeepSpeed behaviours the step executor relies on (megagpt2/pipeline/executor.py, tied.py).

A DeepSpeed upgrade that changes any of them fails here, by name, before it silently breaks the
pipeline's numbers: how engine.backward scales by gradient accumulation, that a tensor hook on a
parameter runs before ZeRO-2 reduces its gradient, how the global grad norm counts parameters
across model-parallel ranks, and how the accumulation boundary drives engine.step().
Each check runs one tiny model in one spawned gloo process.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch
import torch.nn as nn

from tests.dist_utils import run_distributed

GAS = 4


class _Tiny(nn.Module):
    """y = x W^T + b, loss = mean(y^2) when targets are asked for (engine(x, loss=True))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x, loss: bool = False):
        y = self.b(self.a(x))
        return y.pow(2).mean() if loss else y


def _engine(model: nn.Module, stage: int, gas: int = GAS, mpu=None, clip: float = 0.0, lr: float = 0.0):
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=mpu, dist_init_required=False)
    return engine


def _scaling_worker(rank, world):
    """Gradients (ZeRO-0 keeps them in p.grad) after one backward of each kind."""
    from megagpt2.pipeline.executor import _InjectGrad

    torch.manual_seed(1)
    x, g = torch.randn(5, 4), torch.randn(5, 2)
    ref = _Tiny()
    (ref(x) * g).sum().backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    out = {}
    for name, scale_wrt_gas, surrogate in (("default", True, "product"), ("no_gas", False, "product"),
                                           ("inject_no_gas", False, "inject")):
        engine = _engine(_Tiny(), stage=0)
        y = engine(x)  # through the engine: its output hooks are registered
        loss = (y * g).sum() if surrogate == "product" else _InjectGrad.apply(y, g, 1.0)
        engine.backward(loss, scale_wrt_gas=scale_wrt_gas)
        out[name] = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
    return want, out


def test_engine_backward_scales_by_accumulation_steps_unless_told_not_to():
    """The last stage's engine.backward(loss) divides by m; the other stages pass
    scale_wrt_gas=False because the gradient they receive already carries 1/m."""
    want, out = run_distributed(_scaling_worker, 1)[0]
    for n, w in want.items():
        assert torch.allclose(out["default"][n], w / GAS, rtol=1e-6, atol=0), f"default scaling changed ({n})"
        assert torch.allclose(out["no_gas"][n], w, rtol=1e-6, atol=0), f"scale_wrt_gas=False scales ({n})"
        assert torch.allclose(out["inject_no_gas"][n], w, rtol=1e-6, atol=0), f"surrogate gradient wrong ({n})"


def _hook_order_worker(rank, world):
    """ZeRO-2, SGD lr 1, one micro-batch: the update equals the gradient plus what the hook added."""
    torch.manual_seed(2)
    x = torch.randn(5, 4)
    ref = _Tiny()
    ref(x, loss=True).backward()
    extra = torch.full_like(ref.a.weight, 0.25)
    expected = ref.a.weight.detach() - (ref.a.weight.grad + extra)
    engine = _engine(_Tiny(), stage=2, gas=1, lr=1.0)
    engine.module.a.weight.register_hook(lambda grad: grad + extra)
    engine.backward(engine(x, loss=True))
    engine.step()
    return expected, engine.module.a.weight.detach().clone()


def test_tensor_hook_on_a_parameter_runs_before_zero2_reduces_it():
    """The first stage adds the last stage's head gradient to wte's gradient in such a hook."""
    expected, got = run_distributed(_hook_order_worker, 1)[0]
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), "a tensor hook no longer reaches ZeRO-2's reduction"


def _norm_worker(rank, world, stage, mp_rank):
    """Global grad norm when this rank pretends to be model-parallel rank `mp_rank` (TP rank too)."""
    from megagpt2.parallel import ProcessGroups
    from tests.dist_utils import world_groups

    class _Mpu(ProcessGroups):
        def get_model_parallel_rank(self):
            return mp_rank

        def get_tensor_model_parallel_rank(self):
            return mp_rank

    model = _Tiny()
    model.a.weight.model_parallel = True  # counted anywhere; the others only on rank 0
    torch.manual_seed(3)
    x = torch.randn(5, 4)
    g = world_groups()
    engine = _engine(model, stage=stage, gas=1, mpu=_Mpu(g.layout, g.tp, g.dp, g.pp, g.mp), clip=1e9)
    loss = engine(x, loss=True)
    engine.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if stage == 0:  # DeepSpeed keeps no norm at ZeRO-0 fp32: ask the clipping function it uses
        from deepspeed.runtime.utils import clip_grad_norm_

        norm = float(clip_grad_norm_(model.parameters(), max_norm=1e9, mpu=engine.mpu))
    else:
        engine.step()
        norm = float(engine.get_global_grad_norm())
    ref = _Tiny()
    ref(x, loss=True).backward()
    return norm, {n: p.grad.clone() for n, p in ref.named_parameters()}, grads


@pytest.mark.parametrize("stage", [0, 2])
def test_grad_norm_counts_marked_parameters_or_model_parallel_rank_0(stage):
    """Each stage marks its own parameters (TP-replicated ones on TP rank 0 only) so the norm
    summed over the TP x PP group counts every parameter exactly once."""
    norm0, grads, _ = run_distributed(_norm_worker, 1, args=(stage, 0))[0]
    norm1, _, _ = run_distributed(_norm_worker, 1, args=(stage, 1))[0]
    everything = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    marked_only = grads["a.weight"].double().norm().item()
    assert abs(norm0 - everything) <= 1e-5 * everything, "model-parallel rank 0 no longer counts every parameter"
    assert abs(norm1 - marked_only) <= 1e-5 * marked_only, "other ranks no longer count marked parameters only"


def _boundary_worker(rank, world):
    """gas=4, engine.step() after every micro-batch; the update happens on the 4th only, and an
    explicit boundary flag overrides the counter."""
    torch.manual_seed(4)
    x = torch.randn(5, 4)
    engine = _engine(_Tiny(), stage=2, lr=0.1)
    w0 = engine.module.a.weight.detach().clone()
    changed = []
    for _ in range(GAS):
        engine.backward(engine(x, loss=True))
        engine.step()
        changed.append(not torch.equal(engine.module.a.weight, w0))
    w1 = engine.module.a.weight.detach().clone()
    forced = []
    for boundary in (False, True):  # a step of two micro-batches, boundary set by hand
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(engine(x, loss=True))
        engine.step()
        forced.append(not torch.equal(engine.module.a.weight, w1))
    return changed, forced, engine.global_steps


def test_step_updates_at_the_accumulation_boundary_and_the_flag_overrides_the_counter():
    changed, forced, global_steps = run_distributed(_boundary_worker, 1)[0]
    assert changed == [False, False, False, True]
    assert forced == [False, True]
    assert global_steps == 2
