"""Read a DeepSpeed JSON config and resolve what depends on the run: batch sizes and precision.

The JSON is the only place for batch sizes, ZeRO stage, precision and clipping. Global batch =
micro batch x gradient accumulation x data-parallel size: give any two (the third is derived)
or all three (they must agree). A mismatch is an error before any process group exists.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch


class DSConfigError(ValueError):
    """The DeepSpeed config is unreadable or inconsistent with the run's layout."""


def read_ds_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DSConfigError(f"DeepSpeed config {path} does not exist (see configs/ds/zero2.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: not valid JSON: {e}") from e


def resolve_batch(ds: dict[str, Any], dp_size: int, where: str = "DeepSpeed config") -> tuple[int, int, int]:
    """(micro_batch, grad_accum, global_batch) with global = micro x accum x dp, checked."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    for name, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                    ("train_batch_size", total)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DSConfigError(f"{where}: {name} must be a positive integer, got {v!r}")
    if micro is None and accum is None:
        raise DSConfigError(f"{where}: set train_micro_batch_size_per_gpu (and gradient_accumulation_steps "
                            f"or train_batch_size)")
    if micro is None:
        if total % (accum * dp_size):
            raise DSConfigError(f"{where}: train_batch_size={total} is not divisible by "
                                f"gradient_accumulation_steps x data-parallel size = {accum} x {dp_size}")
        micro = total // (accum * dp_size)
    if accum is None:
        if total is None:
            accum = 1
        elif total % (micro * dp_size):
            raise DSConfigError(f"{where}: train_batch_size={total} is not divisible by "
                                f"train_micro_batch_size_per_gpu x data-parallel size = {micro} x {dp_size}")
        else:
            accum = total // (micro * dp_size)
    expected = micro * accum * dp_size
    if total is not None and total != expected:
        raise DSConfigError(
            f"{where}: train_batch_size={total} but train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x data-parallel size = {micro} x {accum} x {dp_size} = {expected}; "
            f"fix one of them (or drop train_batch_size to derive it)")
    return micro, accum, expected


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_ds_config(ds: dict[str, Any], dp_size: int, device: torch.device,
                      allow_cpu_bf16: bool = False) -> dict[str, Any]:
    """A copy of `ds` ready for deepspeed.initialize: batch sizes filled in, "auto" resolved.

    bf16 "auto" means bf16 on a CUDA device that supports it and ZeRO stage >= 1 (with stage 0
    DeepSpeed's bf16 path drifts from fp32), else fp32. Half precision on CPU is refused unless
    `allow_cpu_bf16` (tests of bf16 numerics: DeepSpeed's CPU accelerator runs bf16 with ZeRO >= 1).
    """
    out = copy.deepcopy(ds)
    micro, accum, total = resolve_batch(out, dp_size)
    out.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, train_batch_size=total)
    stage = int(out.get("zero_optimization", {}).get("stage", 0))
    for key in ("bf16", "fp16"):
        sect = out.get(key)
        if isinstance(sect, dict) and sect.get("enabled") == "auto":
            sect["enabled"] = key == "bf16" and bf16_supported(device) and stage >= 1
    if out.get("fp16", {}).get("enabled") and out.get("bf16", {}).get("enabled"):
        raise DSConfigError("DeepSpeed config enables both fp16 and bf16; choose one")
    half = out.get("fp16", {}).get("enabled") or out.get("bf16", {}).get("enabled")
    cpu_ok = allow_cpu_bf16 and out.get("bf16", {}).get("enabled") and stage >= 1
    if device.type != "cuda" and half and not cpu_ok:
        raise DSConfigError(f"half precision is enabled in the DeepSpeed config but the device is {device}; "
                            f"set bf16.enabled to \"auto\" or false for CPU runs")
    if "optimizer" in out or "scheduler" in out:
        raise DSConfigError("the DeepSpeed config must not define optimizer/scheduler: megagpt2 builds "
                            "AdamW and the LR schedule from the optim section of its YAML config")
    out["zero_allow_untested_optimizer"] = True  # our optimizer is torch's AdamW
    return out


def precision(ds_resolved: dict[str, Any]) -> torch.dtype:
    if ds_resolved.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_resolved.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
