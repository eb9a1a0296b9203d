"""Helpers of bench_train.py that are not a row: token files, CPU peak, peak RSS, launch timing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

FIRST_STEP = re.compile(r"^step\s+1\b")  # megagpt2's log line and plain_gpt2.py's both start so
# Variables of the benchmark's own one-rank process group: a child must not join it.
_DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "TORCHELASTIC_RUN_ID",
)


def make_token_file(directory: Path, vocab: int, n_docs: int = 256, doc_len: int = 1100, seed: int = 0) -> str:
    """A random-token MMIDIDX data set (uint16) for the trainer to be built on; returns its prefix."""
    from megagpt2.data import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / "bench_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(n_docs):
        builder.add_document(rng.integers(0, vocab, doc_len).astype(np.uint16))
    builder.finalize(prefix + ".idx")
    return prefix


def cpu_peak_tflops(n: int = 1024, repeats: int = 10) -> float:
    """fp32 matmul rate on this CPU with the benchmark's threads (best of `repeats`): the MFU peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    _ = a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """Peak resident set size since the last reset_peak_rss (GiB; NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 2**20
    except (OSError, StopIteration):
        return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_to_first_step(cmd: list[str], cwd: Path, timeout: float) -> dict:
    """Seconds from starting `cmd` to its first 'step 1' line; the process is then let finish."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(cwd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seconds, tail = None, []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if seconds is None and FIRST_STEP.match(line):
                seconds = time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
        proc.wait(timeout=max(timeout - (time.perf_counter() - t0), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"no first step within {timeout:.0f} s"}
    if seconds is None:
        return {"error": f"exit code {proc.returncode}, no 'step 1' line; last output: {' | '.join(tail[-3:])}"}
    return {"seconds": seconds, "exit_code": proc.returncode}


def plain_command(data_prefix: str, n_layer: int, n_embd: int, n_head: int, seq: int) -> list[str]:
    """benchmarks/plain_gpt2.py for two steps of 8 sequences of this shape: the launch-time baseline."""
    shape = ["--n-layer", str(n_layer), "--n-embd", str(n_embd), "--n-head", str(n_head), "--seq", str(seq)]
    return [
        sys.executable,
        "benchmarks/plain_gpt2.py",
        "--data",
        data_prefix + ".bin",
        "--steps",
        "2",
        *shape,
        "--batch",
        "8",
    ]


def launch_times(
    preset: str, data_prefix: str, device: torch.device, presets: dict, root: Path, timeout: float = 300.0
) -> list[dict]:
    """Launch to first step: the real entry (plain python and the deepspeed launcher) vs a plain script.

    Same model, tokens per step and data file for all three; the entry also loads its tokenizer
    and builds its sample index, as any real run does."""
    from megagpt2.config import load_config

    cfg = load_config(str(root / presets[preset]))
    m, seq = cfg.model, cfg.data.seq_length
    entry = [
        "launch/pretrain_gpt2.py",
        "--deepspeed_config",
        "configs/ds/zero2.json",
        "--config",
        presets[preset],
        f"--data.path={data_prefix}",
        "--data.split=100,0,0",
        "--train.steps=2",
        "--train.eval_interval=0",
        "--checkpoint.dir=null",
        "--logging.interval=1",
        "--logging.plot=false",
        "--logging.sample_prompt=",
        f"--train.device={device.type}",
    ]
    plain = plain_command(data_prefix, m.n_layer, m.n_embd, m.n_head, seq)
    runs = [
        ("plain script (python benchmarks/plain_gpt2.py)", plain),
        ("megagpt2 (python launch/pretrain_gpt2.py)", [sys.executable] + entry),
    ]
    launcher = Path(sys.executable).with_name("deepspeed")
    launcher = str(launcher) if launcher.exists() else shutil.which("deepspeed")
    if launcher:
        runs.append(
            (
                "megagpt2 (deepspeed --num_gpus 1 launch/pretrain_gpt2.py)",  # port 29500 may be taken
                [sys.executable, launcher, "--num_gpus", "1", "--master_port", str(_free_port())] + entry,
            )
        )
    out = []
    for what, cmd in runs:
        print(f"launch timing: {what} ...", file=sys.stderr, flush=True)
        out.append({"what": what, "preset": preset, **_time_to_first_step(cmd, root, timeout)})
    return out
