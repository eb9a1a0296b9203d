"""What a run reports: throughput, model FLOPs utilisation, memory, elapsed time and ETA,
metrics.jsonl (kept free of duplicate steps across resumes), TensorBoard, the loss-curve plot and
the generated sample at the end."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..parallel import ParallelLayout

# Dense bf16 peak TFLOP/s per device (vendor data sheets, without sparsity).
_BF16_PEAK = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), attention included.

    Forward per token: 2 x (weights touched by matmuls) + attention scores and weighted sum,
    2 x 2 x T x C per layer; the output head counts as a (C x V) matmul.
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
    matmul_params = L * 12 * C * C + C * V
    forward = 2 * matmul_params + L * 4 * seq_length * C
    return 3.0 * forward


def peak_tflops(device: torch.device) -> Optional[float]:
    """bf16 dense peak of a known CUDA device, else None (no MFU on CPU or unknown devices)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _BF16_PEAK:
        if key in name:
            return peak
    return None


def memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux
        return 0.0


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h03m, 3d04h: short enough for every step line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def count(n: float) -> str:
    """950, 12.3k, 4.56M, 1.20B, 3.00T tokens."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}" if n < 100 * div else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


class RunClock:
    """Elapsed time and ETA of this process's steps (a resumed run counts from its own start).

    The ETA extrapolates the time per step since the first step of this process finished, so the
    first step's one-off costs (allocation, kernel compilation, index building) do not inflate it."""

    def __init__(self, last_step: int):
        self.last_step = last_step
        self.start = time.time()
        self.first: Optional[tuple[int, float]] = None  # (step, time) when the first step ended

    def begin(self) -> None:
        """The loop starts now (after set-up, resume and the step-0 evaluation)."""
        self.start, self.first = time.time(), None

    def tick(self, step: int) -> None:
        """`step` just finished."""
        if self.first is None:
            self.first = (step, time.time())

    def progress(self, step: int, tokens: int) -> str:
        """'1.23M tokens | 1m05s elapsed | ETA 2m10s' after `step` steps and `tokens` tokens trained."""
        now = time.time()
        per_step = now - self.start
        if self.first is not None and step > self.first[0]:
            per_step = (now - self.first[1]) / (step - self.first[0])
        eta = per_step * max(self.last_step - step, 0)
        return f"{count(tokens)} tokens | {duration(now - self.start)} elapsed | ETA {duration(eta)}"


def truncate_metrics(path: Path, up_to_step: int) -> int:
    """Drop the records of steps after `up_to_step` (a resumed run trains them again) and torn
    lines; of several records of one step and kind (train / validation) the last is kept.
    Atomic: a new file is written and renamed over the old one. Returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept: dict[tuple[int, bool], str] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        step = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(step, int) and step <= up_to_step:
            key = (step, "valid_loss" in rec)
            kept.pop(key, None)  # re-insert: the order of the surviving records is the order they were written
            kept[key] = line
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept.values()))
        os.replace(tmp, path)
    return dropped


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(peak GiB so far, what was measured): CUDA's max allocated, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "allocated"
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 2**20, "resident (process)"
    except (OSError, StopIteration):  # not Linux
        return float("nan"), "unmeasured"


def memory_report(cfg, ds: dict, layout: ParallelLayout, device: torch.device) -> str:
    """One log line: this rank's measured peak next to tools/estimate_memory.py's estimate
    (`ds`: the engine's DeepSpeed config)."""
    from ..memory import estimate_run

    peak, what = peak_memory_gib(device)
    est = estimate_run(cfg, ds, layout.dp, stage=layout.pp_rank)
    return f"memory after step 1: peak {peak:.2f} GiB {what} | estimate {est.describe()}"


class Scalars:
    """TensorBoard scalars (rank 0 only) plus an in-memory history for the final plot."""

    def __init__(self, tb_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.writer = None
        if enabled and tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir)

    def add(self, tag: str, value: float, step: int) -> None:
        if not self.enabled:
            return
        self.history.setdefault(tag, []).append((step, float(value)))
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def restore(self, metrics_path: Path, up_to_step: int) -> None:
        """The curves of a resumed run so far, from metrics.jsonl (the checkpoint keeps none):
        records after `up_to_step` are from a run that did not reach its next checkpoint."""
        if not self.enabled or not metrics_path.is_file():
            return
        points: dict[str, dict[int, float]] = {}
        with open(metrics_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                step = rec.get("step")
                if not isinstance(step, int) or step > up_to_step:
                    continue
                for key, tag in (
                    ("loss", "train/loss"),
                    ("lr", "train/lr"),
                    ("grad_norm", "train/grad_norm"),
                    ("valid_loss", "valid/loss"),
                ):
                    if rec.get(key) is not None:
                        points.setdefault(tag, {})[step] = float(rec[key])
        if "valid/loss" in points:
            points["valid/ppl"] = {k: math.exp(min(v, 50)) for k, v in points["valid/loss"].items()}
        self.history = {tag: sorted(values.items()) for tag, values in points.items()}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self, path: Path) -> Optional[Path]:
        """PNG of train and validation loss against step."""
        if not self.enabled or "train/loss" not in self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for tag, label in (("train/loss", "train"), ("valid/loss", "validation")):
            if tag in self.history:
                steps, values = zip(*self.history[tag])
                ax.plot(steps, values, label=label, marker="o" if tag.startswith("valid") else None)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def prompt_ids(tokenizer, prompt: str, chat: bool, max_tokens: int) -> list[int]:
    """`prompt` laid out as the run's training samples are: a document start (pretraining), or
    for the fine-tuning formats a chat prompt whose one turn is the user's (START prompt SEP,
    megagpt2.data.finetune.chat_prompt), so the sample is the model's reply."""
    ids = tokenizer.encode(prompt)
    if chat:
        from ..data.finetune import chat_prompt

        return chat_prompt([ids[-(max_tokens - 2) :]], tokenizer.eod, max_tokens, start=tokenizer.bos)
    start = tokenizer.bos if tokenizer.bos is not None else tokenizer.eod
    if not ids or (tokenizer.bos is not None and ids[0] != tokenizer.bos):
        ids = [start] + ids  # as documents start in the data
    return ids


def print_sample(
    model,
    tokenizer,
    prompt: str,
    layout: ParallelLayout,
    device: torch.device,
    max_new_tokens: int = 60,
    chat_format: Optional[str] = None,
) -> None:
    """Data-parallel replica 0 samples (all its TP ranks together); rank 0 prints. Pipelines skip it.

    With `chat_format` (data.format of a fine-tune) the prompt is the user's turn and the sample
    is the reply. The sample stops at the end of a document (a turn), never contains the unknown
    or document-start token and is printed without special tokens (readable Chinese with a BERT
    vocabulary)."""
    from ..generation import SamplingConfig, generate, never_generated

    if layout.pp == 1 and layout.dp_rank == 0:
        ids = prompt_ids(tokenizer, prompt, chat_format is not None, model.cfg.n_positions // 2)
        budget = min(max_new_tokens, model.cfg.n_positions - len(ids))
        cfg = SamplingConfig(
            max_new_tokens=max(budget, 1),
            temperature=0.8,
            top_k=40,
            seed=0,
            stop_token=tokenizer.eod,
            banned_tokens=never_generated(tokenizer),
        )
        out = generate(model, [ids], cfg, pad_id=tokenizer.eod)[0]
        model.train()
        if layout.rank == 0:
            text = tokenizer.decode(out, skip_special_tokens=True)
            line = (
                f"sample: {prompt}{text}"
                if chat_format is None
                else (f"sample ({chat_format} layout): user: {prompt} | reply: {text}")
            )
            print(line, flush=True)
    if dist.is_initialized():
        dist.barrier()
