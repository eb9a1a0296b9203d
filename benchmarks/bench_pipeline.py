"""Step time and pipeline bubble of each schedule, for a small GPT-2 on CPU (gloo) ranks.

Each of `--pp` ranks runs the real StepExecutor under a DeepSpeed engine (ZeRO-1, fp32) on
synthetic tokens. Per step it measures the wall time of the schedule (the optimizer step
excluded) and the time spent computing forward/backward passes; the bubble is the idle share
1 - busy / wall, averaged over ranks, printed next to the theory:

    gpipe, 1f1b     (p - 1) / (m + p - 1)
    interleaved     (p - 1) / (v m + p - 1)
    none            (p - 1) / p               (one micro-batch in flight at a time)

    python benchmarks/bench_pipeline.py                     # pp=2, m=8, 8 layers x 256, seq 128
    python benchmarks/bench_pipeline.py --pp 4 --micro-batches 8 --n-embd 256

Give each rank its own core (pp <= cores): ranks that share a core measure the scheduler, not
the pipeline. Figures are printed, never asserted on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from benchmarks.cpu_ranks import run_ranks  # noqa: E402

SCHEDULES = ("none", "gpipe", "1f1b", "interleaved")


class SyntheticData:
    """Stands in for DataState: the same random (micro, seq) batch every time."""

    def __init__(self, micro: int, seq: int, vocab: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (micro, seq + 1), generator=g)

    def next_train(self, device):
        return self.tokens[:, :-1].to(device), self.tokens[:, 1:].to(device), None


def _config(args, schedule: str):
    from megagpt2.config import Config, Schedule

    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.n_positions = args.n_layer, args.n_embd, args.n_head, args.seq
    m.vocab_size, m.make_vocab_size_divisible_by = args.vocab, 64
    m.dropout = m.attn_dropout = 0.0
    m.attention, m.kernels = "torch", "torch"
    cfg.data.seq_length = args.seq
    p = cfg.parallel
    p.pp, p.schedule = args.pp, cast(Schedule, schedule)  # one of SCHEDULES
    p.virtual_stages = args.virtual if schedule == "interleaved" else 1
    return cfg


def _run_schedule(args, schedule: str, groups) -> dict:
    import deepspeed
    import torch

    from megagpt2.pipeline import partition
    from megagpt2.pipeline.executor import StepExecutor
    from megagpt2.pipeline.stage import PipelineStage
    from megagpt2.training.model_setup import build_optimizer

    cfg = _config(args, schedule)
    par = cfg.parallel
    model = PipelineStage(cfg.model, groups, partition(cfg.model, par.pp, par.virtual_stages), seed=cfg.train.seed)
    ds = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": args.micro_batches,
        "train_batch_size": args.micro * args.micro_batches * groups.layout.dp,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.optim), config=ds, mpu=groups, dist_init_required=False
    )
    executor = StepExecutor(engine, model, groups, par)
    data, cpu = SyntheticData(args.micro, args.seq, args.vocab), torch.device("cpu")
    steps, bubbles = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        executor.train_step([data.next_train(cpu) for _ in range(args.micro_batches)])
        if i >= args.warmup:
            steps.append(time.perf_counter() - t0)
            bubbles.append(1.0 - executor.stats["busy_s"] / executor.stats["wall_s"])
    return {"step_s": statistics.median(steps), "bubble": statistics.median(bubbles)}


def _rank_main(rank: int, world: int, args) -> list[dict]:
    """Every schedule's figures on every rank (run on each of `--pp` ranks)."""
    import logging

    import deepspeed
    import torch
    import torch.distributed as dist

    from megagpt2.parallel import ParallelLayout, build_process_groups

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    groups = build_process_groups(ParallelLayout.for_world(world, pp=args.pp, rank=rank), 300)
    results = {s: _run_schedule(args, s, groups) for s in args.schedules}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    return gathered


def theory(schedule: str, m: int, p: int, v: int) -> float:
    from megagpt2.pipeline import theoretical_bubble

    if schedule == "none":
        return (p - 1) / p
    return theoretical_bubble(m, p, v if schedule == "interleaved" else 1)


def report(args, per_rank: list[dict]) -> None:
    p, m, v = args.pp, args.micro_batches, args.virtual
    print(
        f"GPT-2 {args.n_layer} layers x {args.n_embd} hidden, seq {args.seq}, micro-batch {args.micro}, "
        f"pp={p}, m={m} micro-batches per step, v={v} (interleaved), {os.cpu_count()} CPU cores"
    )
    print(f"{'schedule':<12} {'step ms':>9} {'bubble':>8} {'theory':>8} {'(p-1)/(m+p-1)':>14}")
    for s in args.schedules:
        step = max(r[s]["step_s"] for r in per_rank)
        bubble = statistics.mean(r[s]["bubble"] for r in per_rank)
        print(f"{s:<12} {1e3 * step:>9.1f} {bubble:>8.3f} {theory(s, m, p, v):>8.3f} {(p - 1) / (m + p - 1):>14.3f}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8, help="m: micro-batches per optimizer step")
    ap.add_argument("--virtual", type=int, default=2, help="model chunks per rank for the interleaved schedule")
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated subset of " + ",".join(SCHEDULES))
    args = ap.parse_args(argv)
    args.schedules = [s for s in args.schedules.split(",") if s]
    bad = [s for s in args.schedules if s not in SCHEDULES]
    if bad:
        ap.error(f"unknown schedule {bad[0]!r}; choose from {', '.join(SCHEDULES)}")
    if args.n_layer % (args.pp * args.virtual):
        ap.error(f"--n-layer {args.n_layer} must be divisible by --pp x --virtual = {args.pp * args.virtual}")
    per_rank = run_ranks(_rank_main, args.pp, args, timeout_s=300)
    if per_rank is None:
        print("error: a rank failed (see its traceback above)", file=sys.stderr)
        return 1
    report(args, per_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
