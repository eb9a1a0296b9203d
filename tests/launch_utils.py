"""Start real training processes (one per rank, as a launcher would) for process-level tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megagpt2.config import Config, dump_yaml
from tests.dist_utils import dist_env, free_port

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "tests" / "resume_wrapper.py"
HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: MEGAGPT2_TEST_STEP_SECONDS slows every step
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(step_seconds: float = 0.0, **extra: str) -> dict:
    """This process's environment without any launcher's or scheduler's variables (tests may run inside
    a job), with the repository and, when step_seconds > 0, the slow-step hook on PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS
        and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_", "TORCHELASTIC_", "MEGAGPT2_"))
    }
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update(slow_steps(step_seconds), **extra)
    return env


def slow_steps(seconds: float) -> dict:
    """Variables that make every training step `seconds` longer (tests/hooks); {} for 0."""
    return {"PYTHONPATH": f"{HOOKS}:{REPO}", "MEGAGPT2_TEST_STEP_SECONDS": str(seconds)} if seconds else {}


def write_run_files(tmp: Path, cfg: Config, ds: dict) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cfg.yaml").write_text(dump_yaml(cfg))
    (tmp / "ds.json").write_text(json.dumps(ds))
    return tmp / "cfg.yaml", tmp / "ds.json"


def start_ranks(
    world: int,
    cfg_path: Path,
    ds_path: Path,
    extra_env: Optional[dict] = None,
    args: tuple = (),
    log_dir: Optional[Path] = None,
) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            **dist_env(rank, world, port),
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        out = open(log_dir / f"rank{rank}.log", "w") if log_dir else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WRAPPER), "--config", str(cfg_path), "--deepspeed_config", str(ds_path), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240.0) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def read_metrics(ckpt_dir: Path) -> list[dict]:
    f = ckpt_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def train_losses(ckpt_dir: Path) -> dict[int, float]:
    """step -> loss (the last record of a step wins: a resumed run rewrites steps after latest)."""
    return {r["step"]: r["loss"] for r in read_metrics(ckpt_dir) if "loss" in r}


# The runs that stop on a signal: the reference has STOP_STEPS steps and the learning rate decays over
# them whatever train.steps is, so a run given ENDLESS steps (which a signal stops) matches it.
STOP_STEPS, ENDLESS = 24, 100000


def write_stop_files(d: Path) -> dict:
    """A random-token dataset, the tiny config (micro batch 4 x 2 ranks, ZeRO-2) and its DeepSpeed JSON."""
    from tests.train_utils import ds_config, make_dataset, tiny_config

    cfg = tiny_config(make_dataset(d / "data"), None, steps=STOP_STEPS, optim={"decay_steps": STOP_STEPS})
    cfg.parallel.timeout_seconds = 60
    cfg_path, ds_path = write_run_files(d, cfg, ds_config(stage=2, micro=4))
    return {"dir": d, "config": cfg_path, "ds": ds_path}


def reference_losses(files: dict, timeout: float = 300.0) -> dict[int, float]:
    ckpt = files["dir"] / "reference"
    codes = wait_all(
        start_ranks(2, files["config"], files["ds"], args=(f"--checkpoint.dir={ckpt}",), log_dir=files["dir"]),
        timeout=timeout,
    )
    assert codes == [0, 0], (files["dir"] / "rank0.log").read_text()[-3000:]
    losses = train_losses(ckpt)
    assert sorted(losses) == list(range(1, STOP_STEPS + 1))
    return losses
