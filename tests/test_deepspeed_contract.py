"""The DeepSpeed behaviours megagpt2 relies on: the step executor (megagpt2/pipeline/executor.py,
tied.py) and the checkpoint format (megagpt2/checkpoint/engine_state.py).

A DeepSpeed upgrade that changes any of them fails here, by name, before it silently breaks the
pipeline's numbers or a resume: how engine.backward scales by gradient accumulation, that a tensor
hook on a parameter runs before ZeRO-2 reduces its gradient, how the global grad norm counts
parameters across model-parallel ranks, how the accumulation boundary drives engine.step(); which
optimizer wrapper each (ZeRO stage, precision) gets, and ZeRO's per-parameter fragments
(`_hp_mapping`: lp_fragment_address, hp_fragment_address, get_hp_fragment,
lazy_init_hp_params_optimizer_state, update_lp_params). Each check runs one tiny model in spawned gloo processes.
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
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
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
    for name, scale_wrt_gas, surrogate in (
        ("default", True, "product"),
        ("no_gas", False, "product"),
        ("inject_no_gas", False, "inject"),
    ):
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


# -- the checkpoint format's view of the optimizer ---------------------------------------------------
KINDS = {  # name: (ZeRO stage, bf16, extra config, the optimizer class DeepSpeed wraps AdamW in)
    "zero0": (0, False, {}, "AdamW"),
    "zero1": (1, False, {}, "DeepSpeedZeroOptimizer"),
    "zero2": (2, False, {}, "DeepSpeedZeroOptimizer"),
    "zero2-bf16": (2, True, {}, "DeepSpeedZeroOptimizer"),
    "zero0-bf16": (0, True, {}, "FP16_UnfusedOptimizer"),
    "zero1-bf16-fp32-accum": (1, True, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
}


def _adam_engine(kind: str, seed: int = 0):
    stage, bf16, extra, _ = KINDS[kind]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    groups = [
        {"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
        **extra,
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds, dist_init_required=False
    )
    return engine


def _train(engine, steps: int) -> None:
    dtype = next(engine.module.parameters()).dtype
    for i in range(steps):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + i)).to(dtype)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()


def link_fragments(engine) -> None:
    """Link every ZeRO parameter fragment to the optimizer state. DeepSpeed 0.19.8 does it once,
    right after the first parameter group's first step (stage_1_and_2._optimizer_step), so the
    fragments of the other groups stay unlinked and safe_get_full_optimizer_state fails for them;
    megagpt2.checkpoint.engine_state links every group itself before reading."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if groups is None:
        return
    for lps, g in zip(groups, opt.optimizer.param_groups):
        if opt.optimizer.state.get(g["params"][0]):
            lazy_init_hp_params_optimizer_state(lps, g["params"][0], opt.optimizer.state)


def _full_state(engine) -> dict:
    """Masters and moments of every parameter, gathered with DeepSpeed's own functions."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link_fragments(engine)
    opt, out = engine.optimizer, {}
    masters = {}
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 master per parameter
        masters = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "_hp_mapping"):
            out[name] = {
                "master": safe_get_full_fp32_param(p).clone(),
                **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")},
            }
        else:
            hp = masters.get(id(p), p)
            state = (opt.optimizer if masters else opt).state[hp]
            out[name] = {
                "master": hp.detach().float().clone(),
                **{k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")},
            }
        out[name]["lp"] = p.detach().clone()
    return out


def _fragment_worker(rank, world, stage):
    """ZeRO's per-parameter view of the flat partitions, read and written as the checkpoint does."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    engine = _adam_engine(f"zero{stage}")
    _train(engine, 2)
    opt, inner = engine.optimizer, engine.optimizer.optimizer
    flats = [g["params"][0] for g in inner.param_groups]
    for lps, flat in zip(opt.bit16_groups, flats):
        lazy_init_hp_params_optimizer_state(lps, flat, inner.state)
    before = _full_state(engine)
    out = {
        "flats_are_partitions": all(f is s for f, s in zip(flats, opt.single_partition_of_fp32_groups)),
        "ranges": {},
        "views": True,
    }
    for name, p in engine.module.named_parameters():
        hm = p._hp_mapping
        if hm is None:
            continue
        a, n = hm.lp_fragment_address.start, hm.lp_fragment_address.numel
        out["ranges"][name] = (a, n)
        flat = flats[hm.param_group_index]
        h = hm.hp_fragment_address.start
        out["views"] &= torch.equal(hm.get_hp_fragment(), before[name]["master"].view(-1)[a : a + n])
        out["views"] &= hm.get_hp_fragment("exp_avg").data_ptr() == inner.state[flat]["exp_avg"][h:].data_ptr()
        with torch.no_grad():
            hm.get_hp_fragment().add_(1.0)  # write through the views, as a resume does
    for lps, flat in zip(opt.bit16_groups, flats):  # new moment tensors, linked as a resume links them
        for k in ("exp_avg", "exp_avg_sq"):
            inner.state[flat][k] = inner.state[flat][k] * 2
        lazy_init_hp_params_optimizer_state(lps, flat, inner.state)
    opt.update_lp_params()
    return before, _full_state(engine), out


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_fragments_tile_each_parameter_and_write_through(stage):
    results = run_distributed(_fragment_worker, 2, args=(stage,))
    before, after, _ = results[0]
    for r in results:
        assert r[2]["flats_are_partitions"] and r[2]["views"], "ZeRO's fragments no longer view the partitions"
    for name, tensors in before.items():
        covered = sorted(r[2]["ranges"][name] for r in results if name in r[2]["ranges"])
        pos = 0
        for a, n in covered:
            assert a == pos, f"{name}: fragments no longer tile the parameter ({covered})"
            pos += n
        assert pos == tensors["master"].numel(), name
        assert torch.equal(after[name]["master"], tensors["master"] + 1), "writes to get_hp_fragment() are lost"
        assert torch.equal(after[name]["lp"], after[name]["master"]), "update_lp_params no longer refreshes weights"
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[name][k], tensors[k] * 2), f"fragments no longer link to new {k} tensors"


def _kinds_worker(rank, world, tmp):
    """Each kind saves (megagpt2.checkpoint.store) and the next one in KINDS loads it."""
    from pathlib import Path

    import torch.distributed as dist

    from megagpt2.checkpoint import store
    from megagpt2.checkpoint.resume import load_tensors, restore_extras
    from megagpt2.checkpoint.verify import read_meta
    from megagpt2.parallel import ParallelLayout

    ps, names, out = ParallelLayout.for_world(dist.get_world_size(), rank=dist.get_rank()), list(KINDS), {}
    for i, kind in enumerate(names):
        engine = _adam_engine(kind)
        _train(engine, 2)
        state = {"consumed_samples": 0, "layout": {"tp": 1, "pp": 1, "dp": world}}
        root = Path(tmp) / kind
        store.save(engine, ps, str(root), 2, state, keep_last=1)
        target = _adam_engine(names[(i + 1) % len(names)], seed=9)
        meta = read_meta(root / "step_00000002")
        load_tensors(target, ps, root / "step_00000002", meta)
        restore_extras(target, meta)
        out[kind] = (
            type(engine.optimizer).__name__,
            _full_state(engine),
            _full_state(target),
            target.lr_scheduler.last_epoch,
            target.get_lr(),
        )
    return out


def test_every_optimizer_wrapper_saves_and_loads_into_every_other(tmp_path):
    """fp32 ZeRO 0/1/2, bf16 ZeRO-0/1/2: masters and moments move exactly, the model's weights are the
    masters in its own precision afterwards, and the LR schedule continues."""
    names = list(KINDS)
    for i, (kind, (cls, saved, loaded, epoch, lr)) in enumerate(
        run_distributed(_kinds_worker, 2, args=(str(tmp_path),))[0].items()
    ):
        assert cls == KINDS[kind][3], f"{kind}: DeepSpeed now wraps AdamW in {cls}"
        for name in saved:
            for k in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(saved[name][k], loaded[name][k]), (kind, names[(i + 1) % len(names)], name, k)
            assert torch.equal(loaded[name]["lp"], loaded[name]["master"].to(loaded[name]["lp"].dtype))
        assert epoch == 2 and lr == [1e-2 * (1.0 / (1.0 + 2))] * 2, (epoch, lr)  # the LambdaLR at step 2
