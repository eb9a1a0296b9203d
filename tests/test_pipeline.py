"""Pipeline parallelism equals one process: loss, global grad norm and parameters after 3 steps.

Every parallel run trains the real Trainer for 3 optimizer steps with gradient clipping active
(clip 0.05, far below the grad norm) so a wrong norm changes the parameters, dropout off, fp32,
and is compared with one process that runs the same micro-batches by gradient accumulation.
Several configurations share one set of spawned ranks (`jobs`) to keep the suite fast.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.test_training import assert_params_match
from tests.train_utils import ds_config, gathered_params, make_dataset, make_trainer, tiny_config

CLIP = 0.05
RTOL = 1e-5
LR = 3e-3  # tiny_config's learning rate


def _worker_job(rank: int, world: int, cfg_dict: dict, ds: dict, layout: dict, patch=None) -> dict:
    """Train with the real Trainer; record loss, grad norm and the tied-weight copies per step.
    `patch(trainer)`, a module-level function, may alter the trainer before it runs."""
    # The failure tests shorten parallel.timeout_seconds, which bounds the pipeline's waits; the
    # set-up collectives keep a limit that tolerates ranks starting slowly on a loaded machine.
    timeout = max(60, cfg_dict["parallel"]["timeout_seconds"])
    trainer = make_trainer(rank, world, cfg_dict, ds, layout, timeout)
    model, lay = trainer.model, trainer.layout
    records, tied = [], []
    original = trainer.train_step

    def train_step():
        r = original()
        records.append({"loss": r.loss, "grad_norm": r.grad_norm})
        if lay.pp > 1 and (model.pre_process or model.post_process):
            tied.append((model.wte.weight if model.pre_process else model.head_weight).detach().float().clone())
        return r

    trainer.train_step = train_step
    evaluate, evals = trainer.evaluate, []
    trainer.evaluate = lambda: evals.append(evaluate()) or evals[-1]
    if patch is not None:
        patch(trainer)
    trainer.train()
    params = {
        n: (p.detach().float().clone(), getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1))
        for n, p in model.named_parameters()
    }
    return {
        "records": records,
        "ps": (lay.tp_rank, lay.pp_rank, lay.dp_rank),
        "params": params,
        "tied": tied,
        "evals": evals,
        "stats": dict(trainer.executor.stats),
    }


def jobs_worker(rank: int, world: int, jobs: list) -> list:
    """Run several (cfg_dict, ds, layout) trainings one after the other on the same ranks."""
    import torch.distributed as dist

    out = []
    for job in jobs:
        out.append(_worker_job(rank, world, *job))
        dist.barrier()
    return out


def run_jobs(world: int, jobs: list) -> list[list[dict]]:
    """Results[job][rank]."""
    per_rank = run_distributed(jobs_worker, world, args=(jobs,), timeout=300)
    return [[per_rank[r][j] for r in range(world)] for j in range(len(jobs))]


def assert_matches(results: list[dict], reference: dict, rtol: float = RTOL, where: str = "") -> None:
    """Loss and grad norm of every step on every rank, and the gathered parameters."""
    ref = reference["records"]
    assert len(ref) == 3 and all(r["grad_norm"] is not None and r["grad_norm"] > CLIP for r in ref), ref
    for res in results:
        got = res["records"]
        assert len(got) == len(ref), where
        for a, b in zip(got, ref):
            assert abs(a["loss"] - b["loss"]) <= rtol * abs(b["loss"]), (where, got, ref)
            assert a["grad_norm"] is not None and abs(a["grad_norm"] - b["grad_norm"]) <= rtol * b["grad_norm"], (
                where,
                [r["grad_norm"] for r in got],
                [r["grad_norm"] for r in ref],
            )
    for res in results:
        assert len(res["evals"]) == len(reference["evals"]) == 2, where
        for a, b in zip(res["evals"], reference["evals"]):
            assert abs(a - b) <= rtol * b, (where, res["evals"], reference["evals"])
    params, ref_params = gathered_params(results), gathered_params([reference])
    assert set(params) == set(ref_params), (where, set(params) ^ set(ref_params))
    # All parameters together within 1e-5, each tensor within 1e-4 (see assert_params_match on
    # why Adam turns rounding into larger relative differences of near-zero-gradient coordinates).
    assert_params_match(params, ref_params, steps=3, lr=LR)


def assert_tied_identical(results: list[dict]) -> None:
    """After every step the last stage's head copy equals the first stage's embedding."""
    for first in (r for r in results if r["ps"][1] == 0 and r["tied"]):
        tp, _, dp = first["ps"]
        last = [r for r in results if r["ps"][0] == tp and r["ps"][2] == dp and r["ps"][1] != 0 and r["tied"]]
        assert len(last) == 1
        assert len(first["tied"]) == len(last[0]["tied"]) == len(first["records"]) >= 1
        for a, b in zip(first["tied"], last[0]["tied"]):
            assert torch.equal(a, b)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _cfg(data_prefix, n_layer: int, **model) -> dict:
    """3 steps; validation loss before the first and after the last step (through the schedule)."""
    return tiny_config(
        data_prefix, None, steps=3, model={"n_layer": n_layer, **model}, train={"eval_interval": 3, "eval_steps": 1}
    ).to_dict()


def _ds(stage: int, micro: int, accum: int, overlap: bool = None) -> dict:
    ds = ds_config(stage=stage, micro=micro, accum=accum, clip=CLIP)
    if overlap is not None:
        ds["zero_optimization"]["overlap_comm"] = overlap
    return ds


@pytest.fixture(scope="module")
def references(data_prefix):
    """One process, micro-batch 2 x 4 accumulation steps, per (n_layer, ZeRO stage)."""
    keys = [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (8, 2)]
    jobs = [(_cfg(data_prefix, n), _ds(s, 2, 4), {}) for n, s in keys]
    results = run_jobs(1, jobs)
    return {k: r[0] for k, r in zip(keys, results)}


# -- pp = 2 ----------------------------------------------------------------------------------
def test_pp2_every_schedule_zero2_matches_single_process(data_prefix, references):
    """none / gpipe / 1f1b at 2 layers and interleaved (2 chunks per rank) at 4 layers."""
    layouts = [({"pp": 2, "schedule": s}, 2) for s in ("none", "gpipe", "1f1b")]
    layouts.append(({"pp": 2, "schedule": "interleaved", "virtual_stages": 2}, 4))
    jobs = [(_cfg(data_prefix, n), _ds(2, 2, 4), lay) for lay, n in layouts]
    for (lay, n), results in zip(layouts, run_jobs(2, jobs)):
        assert_matches(results, references[(n, 2)], where=str(lay))
        assert_tied_identical(results)


@pytest.mark.parametrize("stage", [0, 1])
def test_pp2_zero0_zero1_match_single_process(data_prefix, references, stage):
    """1f1b and interleaved; ZeRO-1 also with overlap_comm (reduction at the boundary only)."""
    jobs = [
        (_cfg(data_prefix, 2), _ds(stage, 2, 4), {"pp": 2, "schedule": "1f1b"}),
        (
            _cfg(data_prefix, 4),
            _ds(stage, 2, 4, overlap=stage == 1),
            {"pp": 2, "schedule": "interleaved", "virtual_stages": 2},
        ),
    ]
    for (_, _, lay), n, results in zip(jobs, (2, 4), run_jobs(2, jobs)):
        assert_matches(results, references[(n, stage)], where=f"ZeRO-{stage} {lay}")
        assert_tied_identical(results)


def test_activation_checkpointing_gives_the_same_numbers(data_prefix):
    jobs = [
        (
            _cfg(data_prefix, 4, activation_checkpointing=ac),
            _ds(2, 2, 4),
            {"pp": 2, "schedule": "interleaved", "virtual_stages": 2},
        )
        for ac in (False, True)
    ]
    off, on = run_jobs(2, jobs)
    for a, b in zip(off, on):
        assert [r["loss"] for r in a["records"]] == [r["loss"] for r in b["records"]]
        assert [r["grad_norm"] for r in a["records"]] == [r["grad_norm"] for r in b["records"]]
        for name, (p, _, _) in a["params"].items():
            assert torch.equal(p, b["params"][name][0]), name


# -- pp = 4 and 3-D --------------------------------------------------------------------------
@pytest.mark.slow
def test_pp4_every_schedule_matches_single_process(data_prefix, references):
    layouts = [{"pp": 4, "schedule": s} for s in ("none", "gpipe", "1f1b")]
    layouts.append({"pp": 4, "schedule": "interleaved", "virtual_stages": 2})
    layouts.append({"pp": 4, "schedule": "1f1b", "partition": "parameters"})  # blocks 1 + 3 + 3 + 1
    jobs = [(_cfg(data_prefix, 8), _ds(2, 2, 4), lay) for lay in layouts]
    for lay, results in zip(layouts, run_jobs(4, jobs)):
        assert_matches(results, references[(8, 2)], where=str(lay))
        assert_tied_identical(results)


@pytest.mark.slow
def test_tp2_pp2_dp2_on_8_ranks_matches_single_process(data_prefix, references):
    """(tp, pp, dp) = (2, 2, 2): ZeRO-2 with 1f1b, ZeRO-0 and ZeRO-1 with interleaving (and
    sequence parallelism: activations travel as (B, T/tp, C) sequence shards)."""
    inter = {"tp": 2, "pp": 2, "schedule": "interleaved", "virtual_stages": 2}
    jobs = [
        (_cfg(data_prefix, 4), _ds(2, 2, 2), {"tp": 2, "pp": 2, "schedule": "1f1b"}),
        (_cfg(data_prefix, 4), _ds(0, 2, 2), inter),
        (_cfg(data_prefix, 4), _ds(1, 2, 2), {**inter, "sequence_parallel": True}),
    ]
    for (_, ds, lay), results in zip(jobs, run_jobs(8, jobs)):
        stage = ds["zero_optimization"]["stage"]
        assert_matches(results, references[(4, stage)], where=f"ZeRO-{stage} {lay}")
        assert_tied_identical(results)


# -- bf16 --------------------------------------------------------------------------------------
def _bf16_ds(stage: int, micro: int, accum: int) -> dict:
    """bf16 on CPU: the entry refuses it (DeepSpeedConfig.check_device), DeepSpeed and the Trainer do not."""
    ds = _ds(stage, micro, accum)
    ds.update(bf16={"enabled": True}, train_batch_size=micro * accum, zero_allow_untested_optimizer=True)
    return ds


def _global_rel(a: dict, b: dict) -> float:
    num = sum((a[n].float() - b[n].float()).norm() ** 2 for n in b) ** 0.5
    return float(num / sum(b[n].float().norm() ** 2 for n in b) ** 0.5)


def test_bf16_pipeline_matches_one_process_bf16_within_bf16_noise(data_prefix, references):
    """bf16 (ZeRO-2 1f1b, ZeRO-1 interleaved) against one bf16 process: the differences are a
    small fraction of what bf16 itself changes against fp32."""
    ref_jobs = [(_cfg(data_prefix, 4), _bf16_ds(s, 2, 4), {}) for s in (2, 1)]
    refs = [r[0] for r in run_jobs(1, ref_jobs)]
    jobs = [
        (_cfg(data_prefix, 4), _bf16_ds(2, 2, 4), {"pp": 2, "schedule": "1f1b"}),
        (_cfg(data_prefix, 4), _bf16_ds(1, 2, 4), {"pp": 2, "schedule": "interleaved", "virtual_stages": 2}),
    ]
    fp32 = gathered_params([references[(4, 2)]])
    for ref, results in zip(refs, run_jobs(2, jobs)):
        ref_params = gathered_params([ref])
        bf16_vs_fp32 = _global_rel(ref_params, fp32)
        assert bf16_vs_fp32 > 1e-3  # bf16 really ran
        for res in results:
            for a, b in zip(res["records"], ref["records"]):
                assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"]
                assert abs(a["grad_norm"] - b["grad_norm"]) <= 5e-3 * b["grad_norm"]
        assert _global_rel(gathered_params(results), ref_params) < 0.3 * bf16_vs_fp32
        assert_tied_identical(results)


# -- failures ----------------------------------------------------------------------------------
def raise_on_last_stage(trainer) -> None:
    """The last stage raises in its forward pass of step 2."""
    _fail_at_step_2(trainer, trainer.model.post_process, lambda: _raise("injected failure on the last stage"))


def kill_stage_1(trainer) -> None:
    """Pipeline rank 1 dies (no exception, no clean-up) in its forward pass of step 2."""
    import os

    _fail_at_step_2(trainer, trainer.layout.pp_rank == 1, lambda: os._exit(3))


def _raise(msg: str):
    raise RuntimeError(msg)


def _fail_at_step_2(trainer, here: bool, action) -> None:
    if not here:
        return
    model, forward = trainer.model, trainer.model.forward

    def failing(*args, **kwargs):
        if trainer.step == 1:
            action()
        return forward(*args, **kwargs)

    model.forward = failing


@pytest.mark.parametrize("patch,pp", [(raise_on_last_stage, 2), (kill_stage_1, 4)])
def test_a_failing_stage_ends_every_rank_within_the_timeout(data_prefix, patch, pp):
    import time

    cfg = tiny_config(data_prefix, None, steps=3, model={"n_layer": 4}, parallel={"timeout_seconds": 20}).to_dict()
    t0 = time.time()
    with pytest.raises(RuntimeError) as info:
        run_jobs(pp, [(cfg, _ds(2, 2, 4), {"pp": pp, "schedule": "1f1b"}, patch)])
    elapsed = time.time() - t0
    msg = str(info.value)
    assert "TimeoutError" not in msg and elapsed < 120, (elapsed, msg[-2000:])
    if patch is raise_on_last_stage:
        assert "injected failure on the last stage" in msg
    else:
        assert "rank 1 died without a result" in msg
    # Every other rank failed too (rather than hanging) and says which neighbour it waited for.
    survivors = [r for r in range(pp) if (r != 1 if patch is kill_stage_1 else r != pp - 1)]
    for r in survivors:
        assert f"rank {r}:" in msg, (r, msg[-3000:])


def stall_stage_1(trainer) -> None:
    """Pipeline rank 1 stays alive but silent for 20 s in step 2 (then gives up)."""
    import time

    _fail_at_step_2(trainer, trainer.layout.pp_rank == 1, lambda: (time.sleep(20), _raise("stalled stage gives up")))


@pytest.mark.slow
def test_a_silent_stage_fails_its_neighbours_after_the_timeout(data_prefix):
    cfg = tiny_config(data_prefix, None, steps=3, model={"n_layer": 4}, parallel={"timeout_seconds": 8}).to_dict()
    with pytest.raises(RuntimeError) as info:
        run_jobs(2, [(cfg, _ds(2, 2, 4), {"pp": 2, "schedule": "1f1b"}, stall_stage_1)])
    msg = str(info.value)
    assert "rank 0:" in msg and "parallel.timeout_seconds=8" in msg, msg[-3000:]
    assert "Timed out waiting 8000ms" in msg  # gloo's own words: the limit, not a closed socket


# -- non-finite losses ---------------------------------------------------------------------------
def poison_step_2(trainer) -> None:
    """The last stage's forward pass of step 2 produces NaN (after its final LayerNorm)."""
    if trainer.model.post_process:
        trainer.model.ln_f.register_forward_hook(
            lambda module, inputs, output: output * float("nan") if trainer.step == 1 else output
        )


def test_nonfinite_loss_skips_the_step_on_every_stage(data_prefix):
    """train.on_nonfinite=skip with ZeRO-2 (DeepSpeed skips the update) and ZeRO-0 (the micro-batch
    adds no gradient): every rank sees the NaN loss, the weights stay finite, training goes on."""
    import math

    cfg = tiny_config(data_prefix, None, steps=3, model={"n_layer": 4}, train={"on_nonfinite": "skip"}).to_dict()
    jobs = [(cfg, _ds(stage, 2, 4), {"pp": 2, "schedule": "1f1b"}, poison_step_2) for stage in (2, 0)]
    for results in run_jobs(2, jobs):
        for r in results:
            loss = [x["loss"] for x in r["records"]]
            assert math.isnan(loss[1]) and math.isfinite(loss[0]) and math.isfinite(loss[2]), loss
            assert all(bool(p.isfinite().all()) for p, _, _ in r["params"].values())
        assert_tied_identical(results)
