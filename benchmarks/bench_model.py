"""What the fused kernels buy end to end: GPT-2 forward+backward for each kernels x attention choice.

    python benchmarks/bench_model.py                                  # CUDA, 124M, bf16, 8 x 1024
    python benchmarks/bench_model.py --config configs/gpt2/355m.yaml --micro-batch 4 --out f.json

For model.kernels in (torch, triton) and model.attention in (torch, fused_softmax, flash) it
builds the model from the preset (one device, no tensor or pipeline parallelism, parameters in
--dtype as DeepSpeed's bf16 mode keeps them), then times loss + backward on random tokens:
median ms per step (CUDA events on CUDA), tokens/s, peak memory, and the first step's loss. All
six models start from the same weights and tokens; with dropout off (--no-dropout) their losses
agree to rounding, a check that the paths compute the same function. No optimizer step: that
costs the same whichever kernels run. Figures are printed, never asserted on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from megagpt2.config import load_config  # noqa: E402
from megagpt2.kernels.runtime import interpret_enabled  # noqa: E402
from megagpt2.model import GPT2  # noqa: E402
from megagpt2.parallel import ProcessGroups  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION = ("torch", "fused_softmax", "flash")


def step_timer(device: torch.device, warmup: int, iters: int):
    """A function timing fn() -> median ms (CUDA events on CUDA, wall clock elsewhere)."""

    def run(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    return run


def time_model(model: GPT2, idx: torch.Tensor, tgt: torch.Tensor, timer) -> dict:
    """First loss, median ms of loss + backward, and peak memory (GiB, CUDA only)."""
    device = idx.device

    def step():
        model(idx, tgt).backward()

    first_loss = model(idx, tgt).item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = timer(step)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": ms, "peak_gib": peak, "loss": first_loss}


def kernel_choices(device: torch.device) -> list[str]:
    """The kernels worth timing here: Triton only where it can run (CUDA, or the interpreter)."""
    return ["torch", "triton"] if device.type == "cuda" or interpret_enabled() else ["torch"]


def bench(args) -> tuple[dict, list[dict]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = load_config(args.config)
    model_cfg = cfg.model
    if args.no_dropout:
        model_cfg = replace(model_cfg, dropout=0.0, attn_dropout=0.0)
    seq = args.seq or model_cfg.n_positions
    if seq > model_cfg.n_positions:
        raise SystemExit(f"--seq {seq} exceeds the model's context ({model_cfg.n_positions})")
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (args.micro_batch, seq + 1), generator=gen)
    idx, tgt = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    timer = step_timer(device, args.warmup, args.iters)
    state = None  # the first model's weights, loaded into every other one
    rows = []
    for kernels in kernel_choices(device):
        for attention in args.attention:
            torch.manual_seed(args.seed)
            model = GPT2(
                replace(model_cfg, kernels=kernels, attention=attention), ProcessGroups.single(), seed=args.seed
            )
            if state is None:
                state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                model.load_state_dict(state)
            row = {"kernels": kernels, "attention": attention}
            try:
                row.update(time_model(model.to(device=device, dtype=dtype).train(), idx, tgt, timer))
            except Exception as e:  # noqa: BLE001 - one failing pair must not cost the others
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"{kernels} / {attention}: FAILED: {row['error']}", file=sys.stderr)
            rows.append(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = next(
        (r["ms"] for r in rows if r["kernels"] == "torch" and r["attention"] == "torch" and "error" not in r), None
    )
    for r in rows:
        if "error" not in r:
            r["speedup"] = base / r["ms"] if base else float("nan")
            r["tokens_per_s"] = args.micro_batch * seq / (r["ms"] * 1e-3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {
        "device": name,
        "config": args.config,
        "dtype": args.dtype,
        "micro_batch": args.micro_batch,
        "seq": seq,
        "dropout": not args.no_dropout,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "interpreted": device.type != "cuda",
    }
    return meta, rows


def format_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"device: {meta['device']}  {meta['config']}  {meta['dtype']}  "
        f"batch {meta['micro_batch']} x {meta['seq']}  dropout {'on' if meta['dropout'] else 'off'}"
    ]
    head = (
        f"{'kernels':<8} {'attention':<14} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9} "
        f"{'vs torch/torch':>14} {'first loss':>11}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernels']:<8} {r['attention']:<14} FAILED: {r['error'][:80]}")
            continue
        lines.append(
            f"{r['kernels']:<8} {r['attention']:<14} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} "
            f"{r['peak_gib']:9.2f} {r['speedup']:13.2f}x {r['loss']:11.5f}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="configs/gpt2/124m.yaml", help="model preset (its model section)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=0, help="0: the model's context length")
    p.add_argument(
        "--attention", type=lambda s: s.split(","), default=list(ATTENTION), help="comma-separated attention paths"
    )
    p.add_argument("--no-dropout", action="store_true", help="dropout off: the losses must then agree")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    unknown = [a for a in args.attention if a not in ATTENTION]
    if unknown:
        p.error(f"--attention: unknown path(s) {unknown}; choose from {list(ATTENTION)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; pass --device cpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    meta, rows = bench(args)
    print(format_table(meta, rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
