"""benchmarks/gpu_check.sh: its CPU dry run runs every step and writes RESULTS.md; the report
judges each target from the figures; the script stays within what the device job returns."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.kernel_checks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_parse():
    for script in ("gpu_check.sh", "prepare_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def _row(shape, row, ms, mfu=0.5):
    tokens = 16 * 1024
    return {
        "shape": shape,
        "row": row,
        "ms": ms,
        "tokens_per_s": tokens / (ms * 1e-3),
        "tflops": 1.0,
        "mfu": mfu,
        "peak_gib": 1.0,
        "vs_plain_compiled": float("nan"),
        "loss": 10.9,
    }


def test_report_judges_every_target(tmp_path):
    report = load_benchmark("report_train")
    gpu = {
        "meta": {
            "device": "NVIDIA H200",
            "dtype": "bf16",
            "torch": "2.11",
            "date": "d",
            "peak_tflops": 989.0,
            "peak_source": "sheet",
            "iters": 5,
            "warmup": 2,
        },
        "rows": [
            _row("124m 16x1024", "megagpt2:triton:flash:eager", 100, mfu=0.46),
            _row("124m 16x1024", "plain:compile", 105),
            _row("124m 16x1024", "hf:eager", 160),
            _row("1.5b 8x1024", "megagpt2:triton:flash:eager", 100, mfu=0.50),
            _row("1.5b 8x1024", "plain:compile", 90),
            {"shape": "1.5b 8x1024", "row": "hf:eager", "error": "OutOfMemoryError: CUDA"},
        ],
    }
    verdicts = {what: met for what, met, _ in report.bench_targets(gpu)}
    assert verdicts == {
        "124m, best megagpt2 row megagpt2:triton:flash:eager: MFU >= 45%": True,
        "124m, best megagpt2 row megagpt2:triton:flash:eager: >= 1.0x plain:compile": True,
        "124m, best megagpt2 row megagpt2:triton:flash:eager: >= 1.5x hf:eager": True,
        "1.5b, best megagpt2 row megagpt2:triton:flash:eager: MFU >= 55%": False,
        "1.5b, best megagpt2 row megagpt2:triton:flash:eager: >= 1.0x plain:compile": False,
        "1.5b, best megagpt2 row megagpt2:triton:flash:eager: >= 1.5x hf:eager": False,
    }  # no HF figure: missed
    cpu = {
        **gpu,
        "meta": {**gpu["meta"], "device": "cpu"},
        "rows": [_row("tiny 4x128", "megagpt2:torch:flash:eager", 105), _row("tiny 4x128", "plain:eager", 100)],
    }
    ((what, met, got),) = report.bench_targets(cpu)
    assert met and "+5.0%" in got
    judge = load_benchmark("train_check").judge
    a = {s: 10.0 - 0.1 * s for s in range(1, 41)}
    assert judge(a, {s: a[s] * (1 + 5e-3) for s in range(21, 41)}, 40, 20, 1e-2)["resume_matches"]
    assert not judge(a, {s: a[s] for s in range(1, 41)}, 40, 20, 1e-2)["resume_matches"]  # restarted, no resume
    assert judge(a, {}, 40, 20, 1e-2)["loss_falls"]


@pytest.mark.slow
def test_dry_run_writes_results_with_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        **os.environ,
        "GPU_WORK": str(work),
        "GPU_SITE": str(tmp_path / "site"),
        "GPU_BUNDLE": str(tmp_path / "none"),
    }
    subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        check=True,
        timeout=1500,
        capture_output=True,
    )
    summary = (out / "summary.txt").read_text()
    for step in ("cuda_tests", "train", "bench_train_124m", "bench_train_1.5b", "bench_kernels"):
        assert f"{step}: rc=0" in summary, summary
    results = (out / "RESULTS.md").read_text()
    assert "dry run on CPU" in results and "## The main job" in results and "## Targets" in results
    assert "MET: main job: resumed steps equal" in results
    # 4 steps on random tokens: whether the loss fell is reported (MET or MISSED), judged only on the GPU run
    assert "main job: the loss falls" in results
    train = json.loads((out / "train.json").read_text())
    assert train["checks"]["max_rel_diff"] == 0.0  # fp32 on CPU: the resumed steps are exact
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device job returns
