"""The memory estimate (megagpt2.memory, tools/estimate_memory.py) against bytes measured on CPU.

Three layouts of a tiny model trained by the real Trainer on gloo ranks: weights + optimizer
state between steps, the activations autograd holds, and the peak of a step must each be within
10% of the estimate (tests/memory_utils.py says how each is measured). The vocabulary is small
(a 256-token tokenizer.json) so the blocks, not the output head, carry most of the activations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megagpt2.config import ModelConfig
from megagpt2.memory import estimate
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from tests.dist_utils import run_distributed
from tests.memory_utils import measure_second_step
from tests.train_utils import make_dataset, tiny_config, train_worker

BUCKET = 100_000  # ZeRO reduction buffers of the size of the model, so that they count but do not dominate
MODEL = {"vocab_size": 256, "n_embd": 64, "n_positions": 64, "make_vocab_size_divisible_by": 64}
LAYOUTS = {  # name: (world, layout, ZeRO stage, gradient accumulation, model overrides)
    "1 rank, ZeRO-2, flash": (1, {}, 2, 1, {"attention": "flash"}),
    "tp 2 + sequence parallel, ZeRO-1, torch attention": (
        2,
        {"tp": 2, "sequence_parallel": True},
        1,
        1,
        {"attention": "torch"},
    ),
    "pp 2 (1F1B, 2 micro-batches), ZeRO-2, activation checkpointing": (
        2,
        {"pp": 2},
        2,
        2,
        {"activation_checkpointing": True},
    ),
}


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> tuple[str, str]:
    """(data prefix, tokenizer.json) with 256 tokens, the last one <|endoftext|>."""
    import tokenizers
    from tokenizers.models import WordLevel

    d = tmp_path_factory.mktemp("mem")
    vocab = {f"t{i}": i for i in range(255)} | {"<|endoftext|>": 255}
    tokenizers.Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(d / "tokenizer.json"))
    return make_dataset(d, max_token=250), str(d / "tokenizer.json")


def _ds(stage: int, accum: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": BUCKET,
            "allgather_bucket_size": BUCKET,
        },
        "steps_per_print": 10**9,
    }


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_estimate_within_10_percent_of_measured(small_vocab, name):
    world, layout, stage, accum, model = LAYOUTS[name]
    prefix, tok = small_vocab
    cfg = tiny_config(
        prefix,
        None,
        steps=2,
        model={**MODEL, **model},
        data={"seq_length": 64},
        tokenizer={"tokenizer_type": "HFTokenizer", "tokenizer_model": tok},
    )
    results = run_distributed(
        train_worker, world, args=(cfg.to_dict(), _ds(stage, accum), layout, False, measure_second_step)
    )
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    for res in results:
        got = next(r for r in res["records"] if "static" in r)
        est = estimate(
            cfg.model,
            64,
            4,
            tp=tp,
            pp=pp,
            dp=world // (tp * pp),
            zero_stage=stage,
            precision="fp32",
            sequence_parallel=layout.get("sequence_parallel", False),
            grad_accum=accum,
            stage=res["ps"][1],
            reduce_bucket_size=BUCKET,
        )
        for what, want in (("static", est.static), ("activations", est.activations), ("peak", est.peak)):
            assert abs(want / got[what] - 1) <= 0.10, (name, res["ps"], what, want, got[what])


def test_parameter_count_is_the_models():
    cfg = ModelConfig(n_layer=3, n_embd=48, n_head=4, n_positions=32, vocab_size=300, make_vocab_size_divisible_by=64)
    model = GPT2(cfg, ProcessGroups.single())
    assert estimate(cfg, 32, 1, zero_stage=0, precision="fp32").parameters == 4 * model.num_parameters()
    # GPT-2 small with the vocabulary padded to 50304: 124.48M parameters.
    from megagpt2.config import load_config

    gpt2 = load_config(str(Path(__file__).resolve().parents[1] / "configs/gpt2/124m.yaml")).model
    assert estimate(gpt2, 1024, 1, precision="bf16").parameters == 2 * 124_475_904


def test_zero_shards_optimizer_state_and_gradients():
    cfg = ModelConfig(n_layer=4, n_embd=64, n_head=4)
    z0, z1, z2 = (estimate(cfg, 128, 2, dp=4, zero_stage=s, precision="bf16") for s in (0, 1, 2))
    assert abs(z1.optimizer * 4 - z0.optimizer) <= 48  # bf16: 12 bytes/param, ZeRO-1 shards them 1/dp
    assert z1.gradients == z0.gradients and z2.gradients * 4 == z1.gradients
    assert z0.buckets == 0 < z2.buckets


def test_estimate_memory_tool(capsys):
    from tools.estimate_memory import main

    assert (
        main(
            [
                "--config",
                "configs/gpt2/1.5b.yaml",
                "--tp",
                "1",
                "--pp",
                "4",
                "--dp",
                "2",
                "--micro-batch",
                "4",
                "--activation-checkpointing",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stage 3" in out and "peak" in out and "GiB" in out
    with pytest.raises(SystemExit):
        main(["--config", "configs/gpt2/1.5b.yaml", "--pp", "5"])  # 48 layers do not split in 5


def test_training_log_line_puts_the_estimate_next_to_the_measured_peak():
    import re

    import torch

    from megagpt2.config import Config
    from megagpt2.parallel import ParallelLayout
    from megagpt2.training.metrics import memory_report

    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},
    }
    line = memory_report(Config(), ds, ParallelLayout(), torch.device("cpu"))
    m = re.fullmatch(
        r"memory after step 1: peak ([\d.]+) GiB resident \(process\) \| "
        r"estimate ([\d.]+) GiB peak .*",
        line,
    )
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, line
