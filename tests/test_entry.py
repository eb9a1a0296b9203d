"""The training entry under the real launchers: deepspeed (tp=2 on 4 CPU ranks) and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt2.checkpoint.store import find_latest
from tests.dist_utils import free_port
from tests.launch_utils import REPO, train_losses, write_run_files
from tests.train_utils import ds_config, make_dataset, tiny_config

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_deepspeed_launcher_tp2_on_4_cpu_ranks(tmp_path, prefix):
    cfg = tiny_config(prefix, tmp_path / "ckpt", steps=3)
    cfg_path, ds_path = write_run_files(tmp_path, cfg, ds_config(stage=2, micro=4))
    r = _run(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "4",
            str(REPO / "launch" / "pretrain_gpt2.py"),
            "--deepspeed_config",
            str(ds_path),
            "--config",
            str(cfg_path),
            "--parallel.tp=2",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 4 = tp 2 x pp 1 x dp 2" in r.stdout
    assert find_latest(str(tmp_path / "ckpt")) == "step_00000003"
    assert sorted(train_losses(tmp_path / "ckpt")) == [1, 2, 3]


def test_torchrun_2_ranks(tmp_path, prefix):
    cfg = tiny_config(prefix, tmp_path / "ckpt", steps=2)
    cfg_path, ds_path = write_run_files(tmp_path, cfg, ds_config(stage=2, micro=4))
    r = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "launch" / "pretrain_gpt2.py"),
            "--deepspeed_config",
            str(ds_path),
            "--config",
            str(cfg_path),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2 = tp 1 x pp 1 x dp 2" in r.stdout
    assert find_latest(str(tmp_path / "ckpt")) == "step_00000002"


def test_batch_mismatch_fails_before_any_process_group(tmp_path, prefix):
    cfg = tiny_config(prefix, tmp_path / "ckpt", steps=2)
    ds = {**ds_config(stage=2, micro=4), "train_batch_size": 12}
    cfg_path, ds_path = write_run_files(tmp_path, cfg, ds)
    r = _run(
        [
            sys.executable,
            str(REPO / "launch" / "pretrain_gpt2.py"),
            "--deepspeed_config",
            str(ds_path),
            "--config",
            str(cfg_path),
        ],
        tmp_path,
        timeout=60,
    )
    assert r.returncode == 2
    assert "train_batch_size=12 but train_micro_batch_size_per_gpu x gradient_accumulation_steps" in r.stderr


def test_unknown_override_is_a_clear_error(tmp_path):
    r = _run([sys.executable, str(REPO / "launch" / "pretrain_gpt2.py"), "--train.stepz=3"], tmp_path, timeout=60)
    assert r.returncode == 2 and "unknown key train.stepz" in r.stderr
