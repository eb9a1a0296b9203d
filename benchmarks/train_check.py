"""The real main job, checked: train, checkpoint midway, resume in a fresh directory, compare.

    python benchmarks/train_check.py --data data/demo/corpus_text_document --out train.json  # GPU: 124M, 40 steps
    python benchmarks/train_check.py --config configs/gpt2/tiny.yaml --steps 6 --save-at 3 --tolerance 1e-5 ...

Run A: `deepspeed --num_gpus 1 launch/pretrain_gpt2.py --deepspeed_config configs/ds/zero2.json
--config <preset>` for --steps steps, saving at --save-at (bf16 and NCCL on a GPU, fp32 and gloo on
CPU: configs/ds/zero2.json says "auto"). Run B: the same command in a new directory that holds
only A's checkpoint of step --save-at; it resumes there and trains to --steps. Checks: the loss
falls (mean of A's last five steps below its first five; judged from 10 steps on: the dry run's 4 steps on
random tokens are reported, not judged), B starts at step --save-at + 1, and
B's losses equal A's for the same steps within --tolerance (relative; bf16 rounding on a GPU,
exact arithmetic in fp32 on CPU). Also timed: each launch to its first step, and, with
--plain-launch, benchmarks/plain_gpt2.py as a script on the same data and shape. Everything goes
to --out (JSON) for benchmarks/gpu_report.py; the exit code is 0 when all checks pass.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_rows import _DIST_VARS, _free_port  # noqa: E402

STEP_LINE = re.compile(r"^step\s+\d+/\d+ \|")
MEMORY_LINE = re.compile(r"^memory after step 1:")


def launcher() -> list[str]:
    """The deepspeed launcher: its console script where installed, else the module it runs."""
    script = Path(sys.executable).with_name("deepspeed")
    found = str(script) if script.exists() else shutil.which("deepspeed")
    return [sys.executable, found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def run_job(ckpt_dir: Path, args: argparse.Namespace, log_path: Path) -> dict:
    """One launch of the entry: exit code, seconds to its first step, its step/memory lines."""
    import os

    cmd = launcher() + [
        "--num_gpus",
        "1",
        "--master_port",
        str(_free_port()),
        "launch/pretrain_gpt2.py",
        "--deepspeed_config",
        "configs/ds/zero2.json",
        "--config",
        args.config,
        f"--data.path={args.data}",
        f"--data.cache_dir={args.work / 'index-cache'}",
        f"--train.steps={args.steps}",
        "--train.eval_interval=0",
        f"--checkpoint.dir={ckpt_dir}",
        f"--checkpoint.interval={args.save_at}",
        "--logging.interval=1",
        "--logging.plot=false",
        "--logging.sample_prompt=",
        f"--optim.warmup_steps={args.warmup}",
        *args.override,
    ]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    t0, first, lines = time.perf_counter(), None, []
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if first is None and STEP_LINE.match(line):  # step 1, or the first after a resume
                first = time.perf_counter() - t0
            if STEP_LINE.match(line) or MEMORY_LINE.match(line):
                lines.append(line.rstrip())
        rc = proc.wait()
    return {"exit_code": rc, "first_step_s": first, "total_s": time.perf_counter() - t0, "log_lines": lines}


def read_losses(ckpt_dir: Path) -> dict[int, float]:
    """step -> training loss from the run's metrics.jsonl (the exact values)."""
    path = ckpt_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in records if "loss" in r}


MIN_JUDGED_STEPS = 10  # shorter runs report whether the loss fell without failing on it


def judge(a: dict[int, float], b: dict[int, float], steps: int, save_at: int, tol: float) -> dict:
    out = {"loss_falls": False, "resumed_at": min(b) if b else None, "resume_matches": False, "max_rel_diff": None}
    if len(a) >= 2:
        ordered = [a[s] for s in sorted(a)]
        k = min(5, len(ordered) // 2)  # five steps at each end (fewer in a short dry run)
        out["loss_falls"] = sum(ordered[-k:]) / k < sum(ordered[:k]) / k
        out["first_loss"], out["last_loss"] = ordered[0], ordered[-1]
    want = range(save_at + 1, steps + 1)
    if b and min(b) == save_at + 1 and all(s in a and s in b for s in want):
        diffs = [abs(b[s] - a[s]) / abs(a[s]) for s in want]
        out["max_rel_diff"] = max(diffs)
        out["resume_matches"] = max(diffs) <= tol
    return out


def plain_launch(args: argparse.Namespace, log_path: Path) -> dict:
    """Launch to first step of benchmarks/plain_gpt2.py on the same data and model shape."""
    from benchmarks.train_rows import _time_to_first_step, plain_command
    from megagpt2.config import load_config

    cfg = load_config(str(ROOT / args.config), [o.lstrip("-") for o in args.override])
    m, seq = cfg.model, cfg.data.seq_length
    cmd = plain_command(args.data, m.n_layer, m.n_embd, m.n_head, seq)
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
    return _time_to_first_step(cmd, ROOT, timeout=300)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/gpt2/124m.yaml")
    p.add_argument("--data", required=True, help="preprocessed prefix (without .bin/.idx)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-at", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10, help="optim.warmup_steps (short, so the loss falls)")
    p.add_argument("--tolerance", type=float, default=1e-2, help="relative; 1e-2 for bf16")
    p.add_argument("--work", type=Path, default=Path("/tmp/megagpt2_train_check"), help="checkpoints, caches")
    p.add_argument("--out", type=Path, required=True, help="JSON with the losses, checks and timings")
    p.add_argument("--log", type=Path, default=None, help="append both runs' output here (default: stdout)")
    p.add_argument("--plain-launch", action="store_true", help="also time plain_gpt2.py's launch")
    p.add_argument("--override", action="append", default=[], help="extra --section.key=value for both runs")
    args = p.parse_args(argv)
    if not 0 < args.save_at < args.steps:
        p.error("--save-at must be between 0 and --steps")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    log = args.log or Path("/dev/stdout")
    tag = f"step_{args.save_at:08d}"
    result = {"config": args.config, "steps": args.steps, "save_at": args.save_at, "tolerance": args.tolerance}
    result["a"] = run_job(args.work / "a", args, log)
    if (args.work / "a" / tag).is_dir():
        (args.work / "b").mkdir()
        shutil.copytree(args.work / "a" / tag, args.work / "b" / tag)  # B sees only step save_at
        result["b"] = run_job(args.work / "b", args, log)
    else:
        result["b"] = {"exit_code": None, "error": f"run A left no {tag} to resume from"}
    a, b = read_losses(args.work / "a"), read_losses(args.work / "b")
    result["losses_a"], result["losses_b"] = a, b
    result["checks"] = judge(a, b, args.steps, args.save_at, args.tolerance)
    if args.plain_launch:
        result["plain_launch"] = plain_launch(args, log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    checks = result["checks"]
    print(
        f"train check: loss falls {checks['loss_falls']}, resumed at {checks['resumed_at']}, "
        f"resume matches {checks['resume_matches']} (max rel diff {checks['max_rel_diff']})"
    )
    ok = result["a"]["exit_code"] == 0 and result["b"].get("exit_code") == 0
    loss_ok = checks["loss_falls"] or args.steps < MIN_JUDGED_STEPS  # a few steps of noise prove nothing
    return 0 if ok and loss_ok and checks["resume_matches"] else 1


if __name__ == "__main__":
    sys.exit(main())
