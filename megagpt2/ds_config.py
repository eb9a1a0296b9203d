"""The DeepSpeed JSON as a typed object: batch sizes, ZeRO stage, precision and clipping.

The JSON is the only place for these. Global batch = micro batch x gradient accumulation x
data-parallel size: give any two (the third is derived) or all three (they must agree).
`DeepSpeedConfig.from_dict` / `read` check everything that does not depend on the device before
any process group exists; `check_device` adds the device rule once the device is known, and
`engine_config` is the dict deepspeed.initialize gets. A key DeepSpeed does not have is refused
with the closest valid one (ds_keys.py). Nothing here imports torch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from .ds_keys import unknown_keys

Switch = Union[bool, Literal["auto"]]


class DSConfigError(ValueError):
    """The DeepSpeed config is unreadable or inconsistent with the run's layout."""


@dataclass(frozen=True)
class DeepSpeedConfig:
    """What megagpt2 reads from the DeepSpeed JSON; `raw` keeps the rest for DeepSpeed."""

    source: str  # the file, for messages
    raw: dict[str, Any]
    micro_batch: int  # train_micro_batch_size_per_gpu
    grad_accum: int  # gradient_accumulation_steps: micro-batches per optimizer step
    global_batch: int  # train_batch_size = micro_batch x grad_accum x dp
    zero_stage: int
    gradient_clipping: float  # 0 = off
    bf16: Switch
    fp16: Switch

    @classmethod
    def read(cls, path: str, dp_size: int) -> DeepSpeedConfig:
        p = Path(path)
        if not p.is_file():
            raise DSConfigError(f"DeepSpeed config {path} does not exist ({p.absolute()}); see configs/ds/zero2.json")
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DSConfigError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(doc, dp_size, str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], dp_size: int, source: str = "DeepSpeed config") -> DeepSpeedConfig:
        """Check `doc` for `dp_size` data-parallel replicas (raises DSConfigError naming the key)."""
        if not isinstance(doc, dict):
            raise DSConfigError(f"{source}: the top level must be a JSON object")
        unknown = unknown_keys(doc, source)
        if unknown:
            raise DSConfigError("\n  ".join(unknown))
        if "optimizer" in doc or "scheduler" in doc:
            raise DSConfigError(
                f"{source}: the DeepSpeed config must not define optimizer/scheduler: megagpt2 "
                f"builds AdamW and the LR schedule from the optim section of its YAML config"
            )
        micro, accum, total = resolve_batch(doc, dp_size, source)
        zero = doc.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if stage not in (0, 1, 2, 3):
            raise DSConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        clip = doc.get("gradient_clipping", 0.0)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise DSConfigError(f"{source}: gradient_clipping must be a number >= 0 (0 = off), got {clip!r}")
        bf16, fp16 = _switch(doc, "bf16", source), _switch(doc, "fp16", source)
        if bf16 is True and fp16 is True:
            raise DSConfigError(f"{source}: enables both fp16 and bf16; choose one")
        return cls(source, doc, micro, accum, total, int(stage), float(clip), bf16, fp16)

    def precision(self, cuda: bool, bf16_ok: bool) -> Literal["fp32", "bf16", "fp16"]:
        """bf16 "auto" means bf16 on a CUDA device that supports it and ZeRO stage >= 1 (with
        stage 0 DeepSpeed's bf16 path drifts from fp32), else fp32; fp16 "auto" means off."""
        if self.fp16 is True:
            return "fp16"
        if self.bf16 is True or (self.bf16 == "auto" and cuda and bf16_ok and self.zero_stage >= 1):
            return "bf16"
        return "fp32"

    def check_device(self, cuda: bool) -> None:
        """Half precision asked for explicitly on a CPU run is a mistake (DeepSpeed would try)."""
        if not cuda and (self.bf16 is True or self.fp16 is True):
            raise DSConfigError(
                f"{self.source}: half precision is enabled but the run is on CPU; set "
                f'bf16.enabled to "auto" or false for CPU runs'
            )

    def engine_config(self, cuda: bool, bf16_ok: bool) -> dict[str, Any]:
        """A copy of the JSON ready for deepspeed.initialize: batch sizes filled in, "auto" resolved."""
        out = copy.deepcopy(self.raw)
        out.update(
            train_micro_batch_size_per_gpu=self.micro_batch,
            gradient_accumulation_steps=self.grad_accum,
            train_batch_size=self.global_batch,
        )
        chosen = self.precision(cuda, bf16_ok)
        for key in ("bf16", "fp16"):
            sect = out.get(key)
            if isinstance(sect, dict) and sect.get("enabled") == "auto":
                sect["enabled"] = chosen == key
        out["zero_allow_untested_optimizer"] = True  # our optimizer is torch's AdamW
        return out


def _switch(doc: dict[str, Any], key: str, source: str) -> Switch:
    sect = doc.get(key, {})
    value = sect.get("enabled", False) if isinstance(sect, dict) else None
    if value not in (True, False, "auto"):
        raise DSConfigError(f'{source}: {key}.enabled must be true, false or "auto", got {value!r}')
    return value


def resolve_batch(ds: dict[str, Any], dp_size: int, where: str = "DeepSpeed config") -> tuple[int, int, int]:
    """(micro_batch, grad_accum, global_batch) with global = micro x accum x dp, checked."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    for name, v in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accum),
        ("train_batch_size", total),
    ):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DSConfigError(f"{where}: {name} must be a positive integer, got {v!r}")
    if micro is None and (accum is None or total is None):
        raise DSConfigError(
            f"{where}: set train_micro_batch_size_per_gpu (and gradient_accumulation_steps or train_batch_size)"
        )
    if micro is None:
        assert accum is not None and total is not None
        if total % (accum * dp_size):
            raise DSConfigError(
                f"{where}: train_batch_size={total} is not divisible by "
                f"gradient_accumulation_steps x data-parallel size = {accum} x {dp_size}"
            )
        micro = total // (accum * dp_size)
    if accum is None:
        if total is None:
            accum = 1
        elif total % (micro * dp_size):
            raise DSConfigError(
                f"{where}: train_batch_size={total} is not divisible by "
                f"train_micro_batch_size_per_gpu x data-parallel size = {micro} x {dp_size}"
            )
        else:
            accum = total // (micro * dp_size)
    expected = micro * accum * dp_size
    if total is not None and total != expected:
        raise DSConfigError(
            f"{where}: train_batch_size={total} but train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x data-parallel size = {micro} x {accum} x {dp_size} = {expected}; "
            f"fix one of them (or drop train_batch_size to derive it)"
        )
    return micro, accum, expected
