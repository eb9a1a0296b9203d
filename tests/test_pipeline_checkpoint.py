"""Checkpoints of pipeline runs: resume per stage, convert across (tp, pp, dp), export to HF."""

from __future__ import annotations

import pytest
import torch

from megagpt2.config import config_from_dict
from tests.dist_utils import run_distributed
from tests.test_pipeline import _ds, assert_tied_identical, run_jobs
from tests.train_utils import data_state, gathered_params, make_dataset, tiny_config
from tools import convert_checkpoint

STEPS = 4


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_pp2_resume_equals_uninterrupted_run(data_prefix, tmp_path):
    """Interleaved ZeRO-2: 2 steps, save, resume for 2 more == 4 steps straight (the last
    stage's head copy, in no checkpoint, is restored from the first stage)."""
    layout = {"pp": 2, "schedule": "interleaved", "virtual_stages": 2}
    straight = tiny_config(data_prefix, None, steps=STEPS, model={"n_layer": 4}).to_dict()
    first = tiny_config(data_prefix, tmp_path / "ck", steps=2, model={"n_layer": 4}).to_dict()
    resumed = tiny_config(data_prefix, tmp_path / "ck", steps=STEPS, model={"n_layer": 4}).to_dict()
    a, _, c = run_jobs(2, [(cfg, _ds(2, 2, 4), layout) for cfg in (straight, first, resumed)])
    for x, y in zip(a, c):
        assert [r["loss"] for r in x["records"][2:]] == [r["loss"] for r in y["records"]]
        for name, (p, _, _) in x["params"].items():
            assert torch.equal(p, y["params"][name][0]), name
    assert_tied_identical(c)


def _pipeline_next_loss_worker(rank, world, cfg_dict, layout, sources, consumed, micro, accum):
    """Load each of `sources` into this rank's stage of `layout`; mean loss of the next global batch."""
    return [_pipeline_next_loss(cfg_dict, layout, source, consumed, micro, accum) for source in sources]


def _pipeline_next_loss(cfg_dict, layout, source, consumed, micro, accum) -> float:
    from megagpt2.checkpoint.reshard import load_pretrained
    from megagpt2.pipeline import partition
    from megagpt2.pipeline.executor import StepExecutor
    from megagpt2.pipeline.stage import PipelineStage
    from tests.dist_utils import world_groups

    cfg = config_from_dict(cfg_dict)
    for k, v in layout.items():
        setattr(cfg.parallel, k, v)
    par = cfg.parallel
    groups = world_groups(par.tp, par.pp, par.virtual_stages)
    split = partition(cfg.model, par.pp, par.virtual_stages, par.partition)
    model = PipelineStage(cfg.model, groups, split, par.sequence_parallel, seed=999)  # all from `source`
    load_pretrained(model, source)
    executor = StepExecutor(model, model, groups, par)  # the module stands in for the engine
    executor.sync_tied_weight()
    model.eval()
    data = data_state(cfg, groups.layout, micro, micro * accum * groups.layout.dp)
    data.seek(consumed)
    batches = [data.next_train(torch.device("cpu")) for _ in range(accum)]
    return executor.evaluate(batches)  # averaged over data parallelism


def _full_next_loss_worker(rank, world, cfg_dict, source, consumed, global_batch):
    from megagpt2.checkpoint.reshard import load_pretrained
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups

    cfg = config_from_dict(cfg_dict)
    one = ProcessGroups.single()
    model = GPT2(cfg.model, one, seed=999)
    load_pretrained(model, source)
    data = data_state(cfg, one.layout, global_batch, global_batch)
    data.seek(consumed)
    x, y, _ = data.next_train(torch.device("cpu"))
    with torch.no_grad():
        return model(x, y).item()


@pytest.fixture(scope="module")
def run_222(source_222):
    """(tp, pp, dp) = (2, 2, 2), 1f1b, ZeRO-2, a checkpoint after every step (shared: conftest.py)."""
    return source_222


@pytest.mark.slow
def test_convert_222_to_111_and_241_gives_the_same_next_step_loss(run_222):
    """The weights of step 3 give step 4's loss: converted to tp=1, in one process and as a
    (tp, pp, dp) = (2, 4, 1) pipeline; and read directly from the training checkpoint by that
    pipeline (each rank its TP shards of the fp32 masters, the last stage its head copy)."""
    tmp, cfg, results = run_222
    expected = results[0]["records"][3]["loss"]  # step 4: computed with the weights after step 3
    out = tmp / "tp1"
    assert (
        convert_checkpoint.main(["--input", str(tmp / "ckpt" / "step_00000003"), "--output", str(out), "--tp", "1"])
        == 0
    )
    consumed = 3 * 8  # global batch 8 = micro 2 x accum 2 x dp 2
    one = run_distributed(_full_next_loss_worker, 1, args=(cfg, str(out), consumed, 8), timeout=300)[0]
    assert abs(one - expected) <= 1e-5 * expected, (one, expected)
    sources = [str(out), str(tmp / "ckpt" / "step_00000003")]
    got = run_distributed(
        _pipeline_next_loss_worker,
        8,
        args=(cfg, {"tp": 2, "pp": 4, "schedule": "1f1b"}, sources, consumed, 2, 4),
        timeout=300,
    )
    for losses in got:
        assert len(losses) == 2
        for loss in losses:
            assert abs(loss - expected) <= 1e-5 * expected, (got, expected)


@pytest.mark.slow
def test_full_weights_from_a_222_checkpoint_and_hf_export(run_222):
    """Every stage's TP shards gathered by name equal the run's final parameters; the Hugging Face
    export of that checkpoint computes the same logits as our model."""
    from transformers import GPT2LMHeadModel

    from megagpt2.checkpoint.reshard import full_state_dict, load_pretrained
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups

    tmp, cfg, results = run_222
    full = full_state_dict(str(tmp / "ckpt"))  # the newest checkpoint: the final step
    final = gathered_params(results)
    assert set(full) == set(final)
    for name, p in final.items():
        assert torch.equal(full[name], p), name
    out = tmp / "hf"
    assert convert_checkpoint.main(["--input", str(tmp / "ckpt"), "--output", str(out), "--to", "hf"]) == 0
    ours = GPT2(config_from_dict(cfg).model, ProcessGroups.single())
    load_pretrained(ours, str(tmp / "ckpt"))
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    idx = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(idx) - hf(idx).logits).abs().max() < 1e-5
