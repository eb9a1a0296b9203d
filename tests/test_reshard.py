"""Resharding: a tp=2 checkpoint converted to tp=1 and tp=4 gives the same next-step loss."""

from __future__ import annotations

import pytest
import torch

from megagpt2.checkpoint.reshard import default_sharding, full_state_dict, load_pretrained
from megagpt2.config import ModelConfig, config_from_dict
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from tests.dist_utils import run_distributed
from tests.train_utils import data_state, ds_config, losses, make_dataset, tiny_config, train_worker
from tools import convert_checkpoint

STEPS = 4


def _next_loss_worker(rank, world, cfg_dict, source, consumed, micro):
    from tests.dist_utils import world_groups

    cfg = config_from_dict(cfg_dict)
    groups = world_groups(tp=world)
    model = GPT2(cfg.model, groups, seed=999)  # a different init: everything must come from `source`
    load_pretrained(model, source)
    data = data_state(cfg, groups.layout, micro, micro)
    data.seek(consumed)
    x, y, _ = data.next_train(torch.device("cpu"))
    with torch.no_grad():
        return model(x, y).item()


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    prefix = make_dataset(tmp / "data")
    cfg = tiny_config(prefix, tmp / "ckpt", steps=STEPS, checkpoint={"interval": 3, "keep_last": 3})
    results = run_distributed(train_worker, 2, args=(cfg.to_dict(), ds_config(stage=2, micro=8), {"tp": 2}))
    return tmp, cfg, results[0]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_converted_checkpoint_gives_same_next_step_loss(tp2_run, tp):
    tmp, cfg, result = tp2_run
    expected = losses(result)[STEPS - 1]  # step 4's loss: computed with the weights after step 3
    out = tmp / f"tp{tp}"
    assert (
        convert_checkpoint.main(["--input", str(tmp / "ckpt" / "step_00000003"), "--output", str(out), "--tp", str(tp)])
        == 0
    )
    assert len(list(out.glob("model_tp*.safetensors"))) == tp
    got = run_distributed(_next_loss_worker, tp, args=(cfg.to_dict(), str(out), 3 * 8, 8))
    for loss in got:
        assert abs(loss - expected) <= 1e-6 * abs(expected), (tp, loss, expected)


def test_hf_export_from_tp2_matches_transformers(tp2_run):
    from transformers import GPT2LMHeadModel

    tmp, cfg, _ = tp2_run
    out = tmp / "hf"
    assert convert_checkpoint.main(["--input", str(tmp / "ckpt"), "--output", str(out), "--to", "hf"]) == 0
    ours = GPT2(cfg.model, ProcessGroups.single())
    load_pretrained(ours, str(tmp / "ckpt"))  # follows `latest` (step 4)
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(idx) - hf(idx).logits).abs().max() < 1e-5
    # and back: HF -> megagpt2 tp=2 -> full weights equal the original
    back = tmp / "from_hf"
    assert convert_checkpoint.main(["--input", str(out), "--output", str(back), "--tp", "2"]) == 0
    a, b = full_state_dict(str(back)), dict(ours.named_parameters())
    assert all(torch.equal(a[n], p.detach()) for n, p in b.items())


def test_default_sharding_matches_layer_marks():
    m = GPT2(
        ModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=100, make_vocab_size_divisible_by=64),
        ProcessGroups.single(),
    )
    marks = {n: [getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1)] for n, p in m.named_parameters()}
    assert default_sharding(marks) == marks


def test_bad_input_gives_clear_error(tmp_path, capsys):
    assert convert_checkpoint.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
