"""Crash safety: exact resume after SIGKILL, half-written checkpoints, dead ranks, bad shapes."""

from __future__ import annotations

import json
import signal
import time

import pytest

from megagpt2.checkpoint.store import find_latest
from tests.launch_utils import read_metrics, start_ranks, train_losses, wait_all, write_run_files
from tests.train_utils import ds_config, make_dataset, tiny_config


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _files(tmp, prefix, name, steps, **sections):
    cfg = tiny_config(prefix, tmp / name / "ckpt", steps=steps, **sections)
    cfg.parallel.timeout_seconds = 30
    return write_run_files(tmp / name, cfg, ds_config(stage=2, micro=4)), tmp / name / "ckpt"


def test_resume_after_sigkill_is_bit_identical(tmp_path, prefix):
    (cfg_a, ds_a), ck_a = _files(tmp_path, prefix, "straight", 10, checkpoint={"interval": 5})
    assert wait_all(start_ranks(2, cfg_a, ds_a, log_dir=tmp_path / "straight")) == [0, 0]

    (cfg_b, ds_b), ck_b = _files(tmp_path, prefix, "killed", 10, checkpoint={"interval": 5})
    codes = wait_all(start_ranks(2, cfg_b, ds_b, {"KILL_AFTER_SAVE_STEP": "5"}, log_dir=tmp_path / "killed"))
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    assert find_latest(str(ck_b)) == "step_00000005"
    assert max(train_losses(ck_b)) == 5
    state = json.loads((ck_b / "step_00000005" / "megagpt2.json").read_text())
    assert "history" not in state and state["consumed_samples"] == 5 * 8  # the curves are in metrics.jsonl
    assert wait_all(start_ranks(2, cfg_b, ds_b, log_dir=tmp_path / "killed")) == [0, 0]
    log = (tmp_path / "killed" / "rank0.log").read_text()
    assert "resumed from" in log and "step 5" in log
    a, b = train_losses(ck_a), train_losses(ck_b)
    assert sorted(b) == list(range(1, 11))
    for step in range(6, 11):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical


def test_interrupted_checkpoint_is_never_latest(tmp_path, prefix):
    (cfg, ds), ck = _files(tmp_path, prefix, "torn", 4, checkpoint={"interval": 2})
    codes = wait_all(start_ranks(2, cfg, ds, {"KILL_BEFORE_COMPLETE_STEP": "4"}, log_dir=tmp_path / "torn"))
    assert codes[0] == -signal.SIGKILL and codes[1] != 0
    assert (ck / "step_00000004").is_dir() and not (ck / "step_00000004" / "COMPLETE").exists()
    assert find_latest(str(ck)) == "step_00000002"
    assert wait_all(start_ranks(2, cfg, ds, log_dir=tmp_path / "torn")) == [0, 0]
    assert "resumed from" in (tmp_path / "torn" / "rank0.log").read_text()
    assert find_latest(str(ck)) == "step_00000004"


def test_other_model_shape_fails_naming_the_tensor(tmp_path, prefix):
    (cfg, ds), ck = _files(tmp_path, prefix, "shape", 2)
    assert wait_all(start_ranks(1, cfg, ds, log_dir=tmp_path / "shape")) == [0]
    codes = wait_all(start_ranks(1, cfg, ds, args=("--model.n_embd=64",), log_dir=tmp_path / "shape"))
    log = (tmp_path / "shape" / "rank0.log").read_text()
    assert codes == [1]
    assert "tensor wte.weight has shape (50304, 32) in the checkpoint but (50304, 64) in the model" in log


def test_dead_rank_ends_the_job_nonzero(tmp_path, prefix):
    (cfg, ds), ck = _files(tmp_path, prefix, "dead", 100000)
    procs = start_ranks(2, cfg, ds, log_dir=tmp_path / "dead")
    try:
        deadline = time.time() + 300  # start-up is slow on a loaded machine; training then runs forever
        while len(read_metrics(ck)) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert len(read_metrics(ck)) >= 3, "training did not start"
        procs[1].kill()
        t0 = time.time()
        code = wait_all(procs[:1], timeout=90)[0]
        assert code != 0
        assert time.time() - t0 < 60  # collective timeout is 30 s; gloo usually notices at once
    finally:
        for p in procs:  # never leave a 100000-step run behind when an assertion fails
            if p.poll() is None:
                p.kill()
