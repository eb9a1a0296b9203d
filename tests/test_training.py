"""Training under DeepSpeed equals a single process; ZeRO-2 shards optimizer state."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.train_utils import ds_config, losses, make_dataset, tiny_config, train_worker


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_prefix):
    """One process, global batch 8 (micro 8), ZeRO-0: the losses every layout must reproduce."""
    cfg = tiny_config(data_prefix, None, steps=5)
    return run_distributed(train_worker, 1, args=(cfg.to_dict(), ds_config(stage=0, micro=8), {}))[0]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_dp2_losses_equal_single_process(data_prefix, reference, stage):
    cfg = tiny_config(data_prefix, None, steps=5)
    results = run_distributed(train_worker, 2, args=(cfg.to_dict(), ds_config(stage=stage, micro=4), {}))
    ref = losses(reference)
    assert len(ref) == 5 and ref[-1] < ref[0]  # it trains
    for r in results:
        got = losses(r)
        assert len(got) == 5
        for a, b in zip(got, ref):
            assert abs(a - b) <= 1e-6 * abs(b), (stage, got, ref)


def test_gradient_accumulation_equals_larger_micro_batch(data_prefix, reference):
    cfg = tiny_config(data_prefix, None, steps=5)
    r = run_distributed(train_worker, 1, args=(cfg.to_dict(), ds_config(stage=2, micro=4, accum=2), {}))[0]
    for a, b in zip(losses(r), losses(reference)):
        assert abs(a - b) <= 1e-6 * abs(b)


def test_zero2_halves_optimizer_state_per_rank(data_prefix):
    cfg = tiny_config(data_prefix, None, steps=1)
    one = run_distributed(train_worker, 1, args=(cfg.to_dict(), ds_config(stage=2, micro=8), {}))[0]
    two = run_distributed(train_worker, 2, args=(cfg.to_dict(), ds_config(stage=2, micro=4), {}))
    full = one["engine_optimizer_bytes"]
    assert full > 0
    for r in two:
        assert abs(r["engine_optimizer_bytes"] / full - 0.5) <= 0.05, (r["engine_optimizer_bytes"], full)
