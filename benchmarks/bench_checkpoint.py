"""Save and load time and bytes on disk: megagpt2's layout-free checkpoint vs DeepSpeed's native one.

Each of `--dp` CPU (gloo) ranks builds GPT-2 of each shape under a ZeRO engine (fp32, torch AdamW),
takes one optimizer step so that the moments exist, then saves with DeepSpeed's
`engine.save_checkpoint` and with megagpt2.checkpoint.store.save (which goes first alternates
between rounds; dirty pages are flushed before each timed save) and loads each back
(`engine.load_checkpoint`; megagpt2's verification plus reading every rank's slices). Times are
the slowest rank's, medians over `--repeat` rounds; the page cache is warm for both loads.

    python benchmarks/bench_checkpoint.py                       # 124M and 355M, dp=2, ZeRO-2
    python benchmarks/bench_checkpoint.py --shapes 124m --repeat 5 --dir /scratch/bench

What each writes, for P parameters: DeepSpeed the model's weights (4P bytes, rank 0) plus every
rank's ZeRO shard (fp32 masters and two moments, 12P in all, pickled in torch's zip container);
megagpt2 the masters and moments once (12P, safetensors) and a JSON index. Memory: about 16P
bytes per rank for the engine (355M: ~6 GiB per rank). Figures are printed, never asserted on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the checkout

from benchmarks.cpu_ranks import run_ranks  # noqa: E402


def _model_config(shape: str):
    from megagpt2.config import load_config

    cfg = load_config(str(REPO / "configs" / "gpt2" / f"{shape}.yaml")).model
    cfg.dropout = cfg.attn_dropout = 0.0
    cfg.attention, cfg.kernels = "torch", "torch"
    return cfg


def _engine(shape: str, ps, zero: int):
    import deepspeed
    import torch

    from megagpt2.config import OptimConfig
    from megagpt2.model import GPT2
    from megagpt2.training.model_setup import build_optimizer

    cfg = _model_config(shape)
    model = GPT2(cfg, ps)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, OptimConfig()), config=ds, mpu=ps, dist_init_required=False
    )
    x = torch.randint(0, cfg.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    return engine, sum(p.numel() for p in model.parameters())


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _round(engine, ps, root: Path, rank: int, i: int) -> dict:
    """One save + load in each format (which saves first alternates); returns seconds and bytes.
    Dirty pages are flushed before each timed save, so neither pays for the other's writeback."""
    import torch.distributed as dist

    from megagpt2.checkpoint import store
    from megagpt2.checkpoint.legacy import install_safe_loader
    from megagpt2.checkpoint.resume import load_tensors
    from megagpt2.checkpoint.verify import read_meta, verify

    out = {}
    native, ours = root / "native", root / "ours"
    state = {"consumed_samples": 0, "layout": {"tp": 1, "pp": 1, "dp": ps.layout.dp}}
    saves = {
        "native_save": lambda: engine.save_checkpoint(str(native), tag="t", save_latest=False),
        "ours_save": lambda: store.save(engine, ps.layout, str(ours), 1, state, keep_last=1),
    }
    for key in sorted(saves, reverse=bool(i % 2)):
        os.sync()
        out[key] = _timed(saves[key])
    os.sync()
    install_safe_loader(engine)  # what resuming a first-format checkpoint uses
    out["native_load"] = _timed(lambda: engine.load_checkpoint(str(native), tag="t"))
    path = ours / "step_00000001"
    out["ours_verify"] = _timed(lambda: verify(path))
    out["ours_load"] = _timed(lambda: load_tensors(engine, ps.layout, path, read_meta(path)))
    if rank == 0:
        out["native_bytes"], out["ours_bytes"] = _bytes(native / "t"), _bytes(path)
        shutil.rmtree(native)
        shutil.rmtree(ours)
    dist.barrier()
    return out


def _rank_main(rank: int, world: int, args) -> dict:
    """Every shape's rounds, as each rank measured them (run on each of `--dp` ranks)."""
    import logging

    import deepspeed
    import torch
    import torch.distributed as dist

    from megagpt2.parallel import ParallelLayout, build_process_groups

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    ps = build_process_groups(ParallelLayout.for_world(world, rank=rank), 1800)
    results = {}
    for shape in args.shapes:
        engine, n = _engine(shape, ps, args.zero)
        rounds = [_round(engine, ps, Path(args.dir) / shape, rank, i) for i in range(args.repeat)]
        slowest = [None] * world
        dist.all_gather_object(slowest, rounds)
        results[shape] = (n, slowest)
        del engine
    return results


def report(args, results: dict) -> None:
    print(
        f"checkpoint save/load, CPU, tp=pp=1, dp={args.dp}, ZeRO-{args.zero}, fp32; median of {args.repeat} "
        f"round(s), slowest rank; {os.cpu_count()} CPU cores; directory {args.dir}"
    )
    print(f"{'shape':<7} {'params':>8} {'format':<22} {'save s':>8} {'load s':>8} {'MiB on disk':>12}")
    for shape, (n, per_rank) in results.items():

        def med(key, per_rank=per_rank):
            return statistics.median(max(r[i][key] for r in per_rank) for i in range(args.repeat))

        nb, ob = per_rank[0][0]["native_bytes"], per_rank[0][0]["ours_bytes"]
        print(
            f"{shape:<7} {n / 1e6:>7.0f}M {'deepspeed (native)':<22} {med('native_save'):>8.2f} "
            f"{med('native_load'):>8.2f} {nb / 2**20:>12.0f}"
        )
        print(
            f"{'':<7} {'':>8} {'megagpt2 (layout-free)':<22} {med('ours_save'):>8.2f} "
            f"{med('ours_load') + med('ours_verify'):>8.2f} {ob / 2**20:>12.0f}   "
            f"(load = {med('ours_verify'):.2f} verify + {med('ours_load'):.2f} read)"
        )


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--shapes", default="124m,355m", help="comma-separated configs/gpt2/<shape>.yaml names")
    ap.add_argument("--dp", type=int, default=2, help="data-parallel ranks")
    ap.add_argument("--zero", type=int, default=2, choices=(0, 1, 2), help="ZeRO stage")
    ap.add_argument("--repeat", type=int, default=3, help="save/load rounds per shape")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    missing = [s for s in args.shapes if not (REPO / "configs" / "gpt2" / f"{s}.yaml").is_file()]
    if missing:
        ap.error(f"no configs/gpt2/{missing[0]}.yaml")
    scratch = None
    if args.dir is None:
        scratch = args.dir = tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        results = run_ranks(_rank_main, args.dp, args)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if results is None:
        print("error: a rank failed (see its traceback above)", file=sys.stderr)
        return 1
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
