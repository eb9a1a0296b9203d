"""Estimate per-rank memory of a training run before starting it (no model is built, no GPU needed).

    python tools/estimate_memory.py --config configs/gpt2/1.5b.yaml --tp 2 --pp 4 --dp 8 --micro-batch 4
    python tools/estimate_memory.py --config configs/gpt2/124m.yaml --deepspeed_config configs/ds/zero2.json \
        --dp 8 --activation-checkpointing --sequence-parallel

For each pipeline stage it prints the bytes of parameters, kept gradients, DeepSpeed's gradient
reduction buffers, optimizer state (ZeRO 0, 1, 2 shard it over dp), saved activations (with or
without activation checkpointing and sequence parallelism, times the micro-batches the pipeline
schedule holds at once) and the largest short-lived allocation, then the step's peak. Batch
sizes, ZeRO stage, bucket sizes and precision come from the DeepSpeed JSON unless given here.
The model is megagpt2.memory; tests/test_memory_estimate.py holds it within 10% of bytes
measured on CPU. The training log prints the same estimate next to the measured peak at step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.config import ConfigError, load_config  # noqa: E402
from megagpt2.config_checks import validate  # noqa: E402
from megagpt2.ds_config import DeepSpeedConfig, DSConfigError  # noqa: E402
from megagpt2.memory import MemoryEstimate, estimate_run  # noqa: E402

GiB = 2**30
ROWS = ("parameters", "gradients", "buckets", "optimizer", "activations", "transient", "peak")


def table(per_stage: list[MemoryEstimate]) -> str:
    head = f"{'GiB per rank':<14}" + "".join(f"{'stage ' + str(s):>12}" for s in range(len(per_stage)))
    lines = [head, "-" * len(head)]
    for row in ROWS:
        lines.append(f"{row:<14}" + "".join(f"{getattr(e, row) / GiB:12.3f}" for e in per_stage))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="model preset (configs/gpt2/<preset>.yaml)")
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default="configs/ds/zero2.json",
        help="batch sizes, ZeRO stage, buckets, precision",
    )
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=None, help="default: the DeepSpeed JSON's")
    p.add_argument("--grad-accum", type=int, default=None, help="default: the DeepSpeed JSON's")
    p.add_argument("--seq", type=int, default=None, help="default: the config's data.seq_length")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=None, help="default: the DeepSpeed JSON's")
    p.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="default: bf16 when the JSON enables it or says auto with ZeRO >= 1 (as on a GPU), else fp32",
    )
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--schedule",
        choices=("none", "gpipe", "1f1b", "interleaved"),
        default=None,
        help="pipeline schedule (default: the config's)",
    )
    return p.parse_args(argv)


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DSConfigError(f"DeepSpeed config {path} does not exist ({Path(path).absolute()})") from None
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: not valid JSON: {e}") from None


def resolve(args: argparse.Namespace) -> tuple:
    """(config, DeepSpeed settings) for the run described by the arguments; errors exit with a message."""
    overrides = [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}"]
    if args.seq:
        overrides.append(f"data.seq_length={args.seq}")
    if args.sequence_parallel:
        overrides.append("parallel.sequence_parallel=true")
    if args.activation_checkpointing:
        overrides.append("model.activation_checkpointing=true")
    if args.schedule:
        overrides.append(f"parallel.schedule={args.schedule}")
    try:
        cfg = load_config(args.config, overrides)
        validate(cfg)
        ds = _read_json(args.deepspeed_config)
        if args.micro_batch:
            ds["train_micro_batch_size_per_gpu"] = args.micro_batch
            ds.pop("train_batch_size", None)
        if args.grad_accum:
            ds["gradient_accumulation_steps"] = args.grad_accum
            ds.pop("train_batch_size", None)
        checked = DeepSpeedConfig.from_dict(ds, args.dp, args.deepspeed_config)
        micro, accum = checked.micro_batch, checked.grad_accum
    except (ConfigError, DSConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.pp > 1 and cfg.model.n_layer % args.pp:
        raise SystemExit(f"error: model.n_layer={cfg.model.n_layer} does not split into --pp {args.pp} stages")
    return cfg, ds, micro, accum


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, ds, micro, accum = resolve(args)
    zero = ds.get("zero_optimization", {})
    stage = args.zero if args.zero is not None else int(zero.get("stage", 0))
    bf16 = ds.get("bf16", {}).get("enabled")
    precision = args.precision or (
        "bf16"
        if bf16 is True or (bf16 == "auto" and stage >= 1)
        else "fp16"
        if ds.get("fp16", {}).get("enabled") is True
        else "fp32"
    )
    ds = {
        **ds,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {**zero, "stage": stage},
    }
    per_stage = [estimate_run(cfg, ds, args.dp, stage=s, precision=precision) for s in range(args.pp)]
    print(
        f"{args.config}: tp {args.tp} x pp {args.pp} x dp {args.dp}, ZeRO-{stage}, {precision}, micro batch "
        f"{micro} x {cfg.data.seq_length} tokens, {accum} micro-batches per step, activation checkpointing "
        f"{'on' if cfg.model.activation_checkpointing else 'off'}, sequence parallel "
        f"{'on' if cfg.parallel.sequence_parallel else 'off'}"
    )
    print(table(per_stage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
