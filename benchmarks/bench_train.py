"""Training throughput side by side: megagpt2's trainer step against a plain PyTorch GPT-2 and Hugging Face.

    python benchmarks/bench_train.py                                  # CUDA: 124M, bf16, 8 x 1024
    python benchmarks/bench_train.py --models 124m,1.5b --rows 'megagpt2:triton:flash:*,plain:*,hf:*'
    python benchmarks/bench_train.py --device cpu --models tiny --seq 128 --micro-batch 4 --launch

One optimizer step (forward, backward, AdamW with clipping at 1.0; bf16 on CUDA, fp32 on CPU) of
each implementation, in one process, on the same tokens and from the same weights:

  megagpt2:<kernels>:<attention>:<eager|compile>   megagpt2's Trainer.train_step: DeepSpeed engine,
        ZeRO-2 (configs/ds/zero2.json), one rank; model.kernels in {torch, triton} x model.attention
        in {flash, fused_softmax}, with and without model.compile. The trainer's data source is
        swapped for one that yields the benchmark's batch, so every row reads the same tokens.
  plain:<eager|compile>   benchmarks/plain_gpt2.py (nanoGPT-style: nn.Linear, SDPA, fused AdamW,
        bf16 autocast over fp32 weights), eager and torch.compile.
  hf:eager   transformers.GPT2LMHeadModel (sdpa attention), torch AdamW, bf16 autocast.

Per row: median ms of >= 5 timed steps after the first step and --warmup more (compilation and
allocator warm-up excluded), tokens/s, achieved TFLOP/s (the same model FLOPs for every row:
megagpt2.training.metrics.flops_per_token), MFU against the dense bf16 peak of a known GPU (989
TFLOP/s for H100 SXM / H200) or, on CPU, an fp32 matmul peak measured here, peak memory (CUDA:
max allocated; CPU: peak resident set of the process), the ratio to plain:compile, and the first
step's loss (all rows start from the same weights, so with dropout off it agrees to ~1e-3: the
plain and HF references include or drop the vocabulary padding differently). A row that fails is
an error row; shapes that would not fit in memory are skipped rows. --launch also times launch to
first step of the real entry (python and deepspeed launcher) against plain_gpt2.py as a script.
Figures are printed (and written to --out after every row), never asserted on.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the checkout

from benchmarks.plain_gpt2 import PlainConfig, PlainGPT, adamw, train_step  # noqa: E402
from benchmarks.train_rows import cpu_peak_tflops, launch_times, make_token_file, peak_rss_gib, reset_peak_rss  # noqa: E402

PRESETS = {
    "tiny": "configs/gpt2/tiny.yaml",
    "124m": "configs/gpt2/124m.yaml",
    "355m": "configs/gpt2/355m.yaml",
    "774m": "configs/gpt2/774m.yaml",
    "1.5b": "configs/gpt2/1.5b.yaml",
}
REFERENCE = "plain:compile"


def all_rows(device: torch.device, compile_rows: bool) -> list[str]:
    """Every row this device can run: Triton only on CUDA or under TRITON_INTERPRET."""
    from megagpt2.kernels.runtime import interpret_enabled

    kernels = ["torch", "triton"] if device.type == "cuda" or interpret_enabled() else ["torch"]
    modes = ["eager", "compile"] if compile_rows else ["eager"]
    rows = ["plain:" + m for m in modes] + ["hf:eager"]
    return rows + [f"megagpt2:{k}:{a}:{m}" for k in kernels for a in ("flash", "fused_softmax") for m in modes]


class FixedBatches:
    """Stands in for the trainer's DataState: the same micro-batch at every call."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.consumed = x, y, 0

    def next_train(self, device: torch.device):
        self.consumed += self.x.shape[0]
        return self.x, self.y, None


def shape_config(name: str, args: argparse.Namespace, data_prefix: str):
    """The preset's Config with the benchmark's sequence, dropout and a throwaway data set."""
    from megagpt2.config import load_config

    cfg = load_config(str(ROOT / PRESETS[name]))
    seq = args.seq or cfg.model.n_positions
    if seq > cfg.model.n_positions:
        raise SystemExit(f"--seq {seq} exceeds {name}'s context ({cfg.model.n_positions})")
    cfg.model.dropout = cfg.model.attn_dropout = args.dropout
    cfg.data.path, cfg.data.seq_length, cfg.data.split = data_prefix, seq, "100,0,0"
    cfg.train.steps, cfg.train.eval_interval, cfg.train.seed = 10_000, 0, args.seed
    cfg.checkpoint.dir, cfg.logging.plot, cfg.logging.sample_prompt = None, False, ""
    return cfg


def megagpt2_row(cfg, kernels: str, attention: str, compiled: bool, x, y, device: torch.device):
    """(step function, objects to free) for megagpt2's Trainer at this shape, ZeRO-2 over the ranks of
    the running process group (one here; profile_step.py --ranks 2 runs two)."""
    import torch.distributed as dist

    from megagpt2.parallel import build_process_groups
    from megagpt2.training.plan import plan_run
    from megagpt2.training.trainer import Trainer

    cfg.model.kernels, cfg.model.attention, cfg.model.compile = kernels, attention, compiled
    ds = json.loads((ROOT / "configs/ds/zero2.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=x.shape[0], gradient_accumulation_steps=1)
    ds.pop("train_batch_size", None)
    plan = plan_run(cfg, ds, world_size=dist.get_world_size(), rank=dist.get_rank())  # the caller started the group
    plan.ds.check_device(device.type == "cuda")
    trainer = Trainer(plan, build_process_groups(plan.layout), device)
    trainer.data = FixedBatches(x, y)  # pyright: ignore[reportAttributeAccessIssue]  (a stand-in)
    return (lambda: trainer.train_step().loss), [trainer]


def plain_row(cfg, state: dict, compiled: bool, x, y, device: torch.device):
    m = cfg.model
    model = PlainGPT(
        PlainConfig(m.n_layer, m.n_head, m.n_embd, m.n_positions, m.padded_vocab_size, m.dropout, m.layer_norm_eps)
    )
    model.load_state_dict(state)
    model.to(device)
    opt = adamw(model, cfg.optim.lr, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    fwd = cast(nn.Module, torch.compile(model)) if compiled else model  # an OptimizedModule
    return (lambda: train_step(fwd, opt, x, y)), [model, opt, fwd]


def hf_row(cfg, state: dict, x, y, device: torch.device):
    """GPT2LMHeadModel with sdpa attention and torch's default AdamW (what HF's Trainer uses)."""
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    from megagpt2.interop.hf import to_hf_config, to_hf_state_dict

    hf_cfg = to_hf_config(cfg.model)
    hf_cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(hf_cfg)
    model.load_state_dict(to_hf_state_dict(state, cfg.model), strict=False)  # the attn bias buffers stay
    model.to(device).train()  # pyright: ignore[reportArgumentType]  (transformers' hint for .to)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, [model, opt]


def time_row(step, device: torch.device, warmup: int, iters: int) -> dict:
    """First loss (before any update), then the median of `iters` timed steps after `warmup` more."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    first = float(step())
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": sorted(times)[len(times) // 2], "ms_all": times, "loss": first}


def fits(cfg, micro: int, device: torch.device) -> tuple[bool, str]:
    """Would megagpt2's ZeRO-2 step at this shape fit (the memory estimate, with 15% headroom)?"""
    from megagpt2.memory import estimate

    precision = "bf16" if device.type == "cuda" else "fp32"
    need = estimate(cfg.model, cfg.data.seq_length, micro, zero_stage=2, precision=precision).peak / 2**30
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0] / 2**30
    else:
        with open("/proc/meminfo") as f:
            have = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
    ok = need * 1.15 < have
    return ok, f"needs about {need:.1f} GiB (estimate), {have:.1f} GiB free"


def run_row(key: str, cfg, state, x, y, device: torch.device, args) -> dict:
    impl, *rest = key.split(":")
    compiled = rest[-1] == "compile"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    if impl == "megagpt2":
        step, keep = megagpt2_row(cfg, rest[0], rest[1], compiled, x, y, device)
    elif impl == "plain":
        step, keep = plain_row(cfg, state, compiled, x, y, device)
    else:
        step, keep = hf_row(cfg, state, x, y, device)
    try:
        out = time_row(step, device, args.warmup, args.iters)
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gib()
        return out
    finally:
        del step, keep
        gc.collect()
        if compiled:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def add_derived(rows: list[dict], peak: float | None) -> None:
    """tokens/s, TFLOP/s, MFU and the ratio to plain:compile of the same shape."""
    for r in rows:
        if "ms" not in r:
            continue
        r["tokens_per_s"] = r["tokens_per_step"] / (r["ms"] * 1e-3)
        r["tflops"] = r["flops_per_token"] * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] / peak if peak else float("nan")
        ref = next((q for q in rows if q["shape"] == r["shape"] and q["row"] == REFERENCE and "ms" in q), None)
        r["vs_plain_compiled"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")


def bench(args: argparse.Namespace) -> dict:
    from megagpt2.config import load_config
    from megagpt2.training.metrics import peak_tflops

    device = torch.device(args.device)
    peak = peak_tflops(device) if device.type == "cuda" else cpu_peak_tflops()
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    prefix = make_token_file(Path(tmp.name), load_config(str(ROOT / PRESETS["tiny"])).model.vocab_size)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "peak_tflops": peak,
        "peak_source": "dense bf16 data sheet" if device.type == "cuda" else "fp32 matmul measured here",
        "warmup": args.warmup,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
    }
    result = {"meta": meta, "rows": [], "launch": []}
    if args.launch:
        result["launch"] = launch_times(
            args.launch_config or ("124m" if device.type == "cuda" else "tiny"), prefix, device, PRESETS, ROOT
        )
        _save(args, result)
    with one_rank_group(device):
        for name in args.models:
            _bench_shape(name, args, prefix, device, peak, result)
    tmp.cleanup()
    return result


def _bench_shape(name: str, args: argparse.Namespace, prefix: str, device: torch.device, peak, result: dict) -> None:
    """Every wanted row at one preset, appended to result["rows"] (and saved) one by one."""
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups
    from megagpt2.training.metrics import flops_per_token

    cfg = shape_config(name, args, prefix)
    seq, micro = cfg.data.seq_length, args.micro_batch
    shape = f"{name} {micro}x{seq}"
    base = {"shape": shape, "tokens_per_step": micro * seq, "flops_per_token": flops_per_token(cfg.model, seq)}
    ok, why = fits(cfg, micro, device)
    available = all_rows(device, not args.no_compile)
    wanted = []  # in the order of the --rows patterns: a time limit then costs the last ones
    for pattern in args.rows:
        wanted += [k for k in available if fnmatch.fnmatch(k, pattern) and k not in wanted]
    if not ok:
        result["rows"] += [{**base, "row": k, "skipped": why} for k in wanted]
        print(f"{shape}: skipped, {why}", file=sys.stderr)
        _save(args, result)
        return
    need_state = any(not k.startswith("megagpt2") for k in wanted)  # the reference rows start from our weights
    state = GPT2(cfg.model, ProcessGroups.single(), seed=args.seed).state_dict() if need_state else None
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    for key in wanted:
        row = {**base, "row": key}
        print(f"{shape} {key} ...", file=sys.stderr, flush=True)
        try:
            row.update(run_row(key, cfg, state, x, y, device, args))
        except Exception as e:  # noqa: BLE001 - one failing row must not cost the others
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(f"{shape} {key}: FAILED: {row['error']}", file=sys.stderr)
        result["rows"].append(row)
        add_derived(result["rows"], peak)
        _save(args, result)


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A one-rank process group for the DeepSpeed engine (gloo on CPU, NCCL on CUDA), quietly;
    afterwards the group is destroyed and the environment put back (main() may run inside tests)."""
    import logging

    import torch.distributed as dist

    from megagpt2.distributed import detect_env, init_distributed

    saved = dict(os.environ)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    owned = not dist.is_initialized()
    if owned:
        init_distributed(detect_env(), device, 600)
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def _save(args: argparse.Namespace, result: dict) -> None:
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def format_table(result: dict) -> str:
    meta = result["meta"]
    peak = meta["peak_tflops"]
    lines = [
        f"device: {meta['device']}  {meta['dtype']}  torch {meta['torch']}  {meta['date']}  peak "
        f"{peak:.3g} TFLOP/s ({meta['peak_source']})"
        if peak
        else f"device: {meta['device']}"
    ]
    head = (
        f"{'shape':<14} {'row':<34} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak GiB':>8} {'vs plain:compile':>16} {'first loss':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        lead = f"{r['shape']:<14} {r['row']:<34}"
        if "error" in r or "skipped" in r:
            lines.append(f"{lead} {'FAILED: ' + r['error'][:90] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        lines.append(
            f"{lead} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} {r['tflops']:8.3f} {100 * r['mfu']:5.1f}% "
            f"{r['peak_gib']:8.2f} {_ratio(r['vs_plain_compiled']):>16} {r['loss']:10.4f}"
        )
    for r in result.get("launch", []):
        took = f"{r['seconds']:.1f} s" if "seconds" in r else f"FAILED: {r['error'][:90]}"
        lines.append(f"launch to first step, {r['what']}: {took}")
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"  # NaN: no plain:compile row at this shape


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated presets from {', '.join(PRESETS)} (default: 124m on CUDA, tiny on CPU)",
    )
    p.add_argument("--seq", type=int, default=0, help="0: the preset's context (1024; tiny: 128)")
    p.add_argument("--micro-batch", type=int, default=0, help="0: 8 on CUDA, 4 on CPU")
    p.add_argument(
        "--rows",
        type=lambda s: s.split(","),
        default=["*"],
        help="comma-separated glob patterns over row names, e.g. 'megagpt2:triton:*,plain:*'",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout of every row (0: the losses agree)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--iters", type=int, default=5, help="timed steps (the median is reported; >= 5)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--launch", action="store_true", help="also time launch to first step (entry vs plain script)")
    p.add_argument(
        "--launch-config",
        choices=sorted(PRESETS),
        default=None,
        help="preset of the launch timing (default: 124m on CUDA, tiny on CPU)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here (after every row)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not cuda:
        p.error("--device cuda but CUDA is not available; pass --device cpu")
    args.models = args.models or (["124m"] if args.device.startswith("cuda") else ["tiny"])
    unknown = [m for m in args.models if m not in PRESETS]
    if unknown:
        p.error(f"--models: unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    if args.iters < 5:
        p.error("--iters must be >= 5 (the median of at least five steps)")
    args.micro_batch = args.micro_batch or (8 if args.device.startswith("cuda") else 4)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = bench(args)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
