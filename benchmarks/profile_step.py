"""Where a training step's time goes besides the model: megagpt2's trainer step against the plain reference.

    python benchmarks/profile_step.py                         # CPU, tiny preset, 1 rank
    python benchmarks/profile_step.py --ranks 2 --out prof.json   # ZeRO-2 over 2 gloo ranks

For the plain reference (benchmarks/plain_gpt2.py, eager) and for Trainer.train_step (DeepSpeed
engine, configs/ds/zero2.json, micro batch x 1) on the same shape it profiles --steps steps after
--warmup and reports, per step: the host syncs (aten::_local_scalar_dense: .item(), float(),
.cpu() of a result; free on CPU, a stall of the host on a GPU), operator calls, allocations and
the bytes they ask for (the profiler's memory events), collectives, and the operators and Python
functions with the most own time (cProfile, outside the profiler). Counts are exact and hold on a
busy machine; times are as measured and say so. With --ranks 2 the ranks run ZeRO-2 on gloo and
rank 0 reports. Figures are printed (and written to --out), never asserted on.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train  # noqa: E402
from benchmarks.cpu_ranks import run_ranks  # noqa: E402
from benchmarks.train_rows import make_token_file  # noqa: E402

COLLECTIVE_WORDS = ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "allgather", "broadcast", "barrier")


def counts(prof, steps: int) -> dict:
    """Per-step counts from a torch.profiler run of `steps` steps."""
    events = list(prof.profiler.kineto_results.events())
    ops = [e for e in events if e.name() != "[memory]"]
    allocs = [e for e in events if e.name() == "[memory]" and e.nbytes() > 0]
    names = Counter(e.name() for e in ops)
    collectives = sum(
        n
        for name, n in names.items()
        if any(w in name.lower() for w in COLLECTIVE_WORDS)
        and name.startswith(("c10d::", "gloo:", "nccl:", "record_param_comms"))
    )
    self_ms = Counter()
    for e in prof.key_averages():
        self_ms[e.key] = e.self_cpu_time_total / 1e3 / steps
    return {
        "host_syncs": names["aten::_local_scalar_dense"] / steps,
        "ops": len(ops) / steps,
        "allocations": len(allocs) / steps,
        "alloc_mib": sum(e.nbytes() for e in allocs) / 2**20 / steps,
        "collectives": collectives / steps,
        "top_ops_ms": self_ms.most_common(8),
    }


def python_hotspots(step, steps: int, n: int = 12) -> list[str]:
    """The Python functions with the most own time over `steps` steps (cProfile)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(n)
    lines = [line for line in out.getvalue().splitlines() if line.strip() and line.strip()[0].isdigit()]
    return lines[:n]


def profile_impl(name: str, step, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(args.steps):
            step()
    return {
        "impl": name,
        "ms_median": sorted(times)[len(times) // 2],
        **counts(prof, args.steps),
        "python": python_hotspots(step, args.steps),
    }


def run(rank: int, args) -> list[dict]:
    """Both implementations on this rank (plain only on one rank: it has no data parallelism)."""
    device = torch.device("cpu")
    cfg = bench_train.shape_config(args.model, args, args.data_prefix)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, cfg.data.seq_length + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    out = []
    if args.ranks == 1:
        from megagpt2.model import GPT2
        from megagpt2.parallel import ProcessGroups

        state = GPT2(cfg.model, ProcessGroups.single(), seed=args.seed).state_dict()
        step, keep = bench_train.plain_row(cfg, state, False, x, y, device)
        out.append(profile_impl("plain:eager", step, args))
        del step, keep
    step, keep = bench_train.megagpt2_row(cfg, "torch", "flash", False, x, y, device)
    out.append(profile_impl(f"megagpt2 trainer step, ZeRO-2, {args.ranks} rank(s)", step, args))
    return out


def _rank_main(rank: int, world: int, args) -> list:
    import logging

    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return run(rank, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--ranks", type=int, choices=(1, 2), default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.dropout, args.no_compile = 0.0, True
    tmp = tempfile.TemporaryDirectory(prefix="profile_step_")
    args.data_prefix = make_token_file(Path(tmp.name), 50257)
    try:
        rows = run_ranks(_rank_main, args.ranks, args, timeout_s=600)
    finally:
        tmp.cleanup()
    if rows is None:
        print("error: a rank failed (see its traceback above)", file=sys.stderr)
        return 1
    for r in rows:
        print(f"\n== {r['impl']}: {r['ms_median']:.1f} ms/step (this machine, as measured)")
        print(
            f"   per step: {r['host_syncs']:.0f} host syncs, {r['ops']:.0f} op calls, {r['allocations']:.0f} "
            f"allocations ({r['alloc_mib']:.1f} MiB), {r['collectives']:.0f} collectives"
        )
        print("   most own time (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in r["top_ops_ms"]))
        print("   Python, most own time over the profiled steps (cProfile):")
        print("\n".join("     " + line for line in r["python"]))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
