"""How fast batched scoring runs: examples/s for LAMBADA- and HellaSwag-shaped tasks.

    python benchmarks/bench_eval.py                       # tiny and 124M shapes, CPU, batch 1 and 16
    python benchmarks/bench_eval.py --shapes 124m --batch-sizes 8,32 --device cuda --out eval.json

Random weights and random tokens of the tasks' real lengths (LAMBADA: ~80-token passage and a
1-3 token last word; HellaSwag: ~40-token context and 4 endings of ~20 tokens; lengths vary per
example so batches are padded as in a real run). Each example goes through
`megagpt2.eval.score_continuations`, the code every scoring task and the lm-eval backend use,
with the batch sizes asked for; batch 1 is the unbatched baseline. Figures are printed (and
written with --out), never asserted on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from megagpt2.config import Config  # noqa: E402
from megagpt2.eval import score_continuations  # noqa: E402
from megagpt2.model import GPT2  # noqa: E402
from megagpt2.parallel import ProcessGroups  # noqa: E402

SHAPES = {"tiny": (2, 32, 4), "124m": (12, 768, 12)}  # n_layer, n_embd, n_head


def build(shape: str, device: str) -> GPT2:
    cfg = Config().model
    cfg.n_layer, cfg.n_embd, cfg.n_head = SHAPES[shape]
    cfg.vocab_size, cfg.n_positions, cfg.dropout, cfg.attn_dropout = 50257, 1024, 0.0, 0.0
    cfg.attention = "flash"
    return GPT2(cfg, ProcessGroups.single(), seed=0).to(device).eval()


def task_pairs(task: str, n: int, seed: int = 0) -> tuple[list, int]:
    """(pairs of (context ids, continuation ids), examples); HellaSwag has 4 pairs per example."""
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return rng.integers(0, 50000, int(rng.integers(lo, hi))).tolist()

    if task == "lambada":
        return [(ids(60, 100), ids(1, 4)) for _ in range(n)], n
    pairs = []
    for _ in range(n):
        ctx = ids(25, 55)
        pairs += [(ctx, ids(12, 30)) for _ in range(4)]
    return pairs, n


def measure(model: GPT2, task: str, n: int, batch_size: int, device: str) -> dict:
    pairs, examples = task_pairs(task, n)
    score_continuations(model, pairs[:batch_size], 50256, batch_size)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    score_continuations(model, pairs, 50256, batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "task": task,
        "batch_size": batch_size,
        "examples": examples,
        "seconds": round(dt, 3),
        "examples_per_s": round(examples / dt, 2),
        "sequences_per_s": round(len(pairs) / dt, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default="tiny,124m", help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--tasks", default="lambada,hellaswag")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--examples", type=int, default=64, help="examples per measurement (tiny: 4x this)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'shape':<6} {'task':<10} {'batch':>5} {'examples/s':>11} {'seqs/s':>9} {'seconds':>8}")
    for shape in args.shapes.split(","):
        model = build(shape, args.device)
        n = args.examples * (4 if shape == "tiny" else 1)
        for task in args.tasks.split(","):
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                with torch.inference_mode():
                    row = {"shape": shape, **measure(model, task, n, bs, args.device)}
                rows.append(row)
                print(
                    f"{shape:<6} {task:<10} {bs:>5} {row['examples_per_s']:>11.2f} {row['sequences_per_s']:>9.2f} "
                    f"{row['seconds']:>8.2f}",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
