"""The pretraining command line: its parser, `--help` with every config key, hints for habits.

Everything after the entry's own flags goes through `config.parse_overrides`, the one parser
of `--section.key=value`. `--help` lists every config key with its type, default and
description, generated from the config dataclasses (no torch is imported: it answers at once).
Flags that Megatron-LM and nanoGPT users type by habit get a message naming the equivalent.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import textwrap
import tokenize
from typing import Any, Optional, Sequence

from ..config import Config, ConfigError, parse_overrides

USAGE = """deepspeed launch/pretrain_gpt2.py --deepspeed_config configs/ds/zero2.json \\
        --config configs/gpt2/tiny.yaml [--section.key=value ...]"""

DS_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
    "gradient_clipping",
)

# Megatron-LM flag -> our config key, or ("ds", key in the DeepSpeed JSON).
MEGATRON_FLAGS: dict[str, Any] = {
    "data-path": "data.path",
    "split": "data.split",
    "seq-length": "data.seq_length",
    "data-cache-path": "data.cache_dir",
    "num-workers": "data.num_workers",
    "micro-batch-size": ("ds", "train_micro_batch_size_per_gpu"),
    "global-batch-size": ("ds", "train_batch_size"),
    "tensor-model-parallel-size": "parallel.tp",
    "pipeline-model-parallel-size": "parallel.pp",
    "num-layers-per-virtual-pipeline-stage": "parallel.virtual_stages",
    "sequence-parallel": "parallel.sequence_parallel",
    "num-layers": "model.n_layer",
    "hidden-size": "model.n_embd",
    "num-attention-heads": "model.n_head",
    "max-position-embeddings": "model.n_positions",
    "hidden-dropout": "model.dropout",
    "attention-dropout": "model.attn_dropout",
    "init-method-std": "model.init_std",
    "layernorm-epsilon": "model.layer_norm_eps",
    "make-vocab-size-divisible-by": "model.make_vocab_size_divisible_by",
    "recompute-activations": "model.activation_checkpointing",
    "checkpoint-activations": "model.activation_checkpointing",
    "lr": "optim.lr",
    "min-lr": "optim.min_lr",
    "weight-decay": "optim.weight_decay",
    "adam-beta1": "optim.beta1",
    "adam-beta2": "optim.beta2",
    "adam-eps": "optim.eps",
    "lr-warmup-iters": "optim.warmup_steps",
    "lr-decay-iters": "optim.decay_steps",
    "lr-decay-style": "optim.decay_style",
    "clip-grad": ("ds", "gradient_clipping"),
    "bf16": ("ds", "bf16.enabled"),
    "fp16": ("ds", "fp16.enabled"),
    "zero-stage": ("ds", "zero_optimization.stage"),
    "train-iters": "train.steps",
    "seed": "train.seed",
    "eval-interval": "train.eval_interval",
    "eval-iters": "train.eval_steps",
    "exit-duration-in-mins": "train.max_minutes",
    "save": "checkpoint.dir",
    "load": "checkpoint.dir",
    "save-interval": "checkpoint.interval",
    "log-interval": "logging.interval",
    "tensorboard-dir": "logging.tensorboard_dir",
    "tokenizer-type": "tokenizer.tokenizer_type",
    "vocab-file": "tokenizer.vocab_file",
    "merge-file": "tokenizer.merge_file",
    "tokenizer-model": "tokenizer.tokenizer_model",
}
# nanoGPT configurator keys whose names differ from ours (same-named ones are found by name).
NANOGPT_FLAGS: dict[str, Any] = {
    "max_iters": "train.steps",
    "learning_rate": "optim.lr",
    "block_size": "data.seq_length",
    "out_dir": "checkpoint.dir",
    "warmup_iters": "optim.warmup_steps",
    "lr_decay_iters": "optim.decay_steps",
    "eval_iters": "train.eval_steps",
    "log_interval": "logging.interval",
    "grad_clip": ("ds", "gradient_clipping"),
    "batch_size": ("ds", "train_micro_batch_size_per_gpu"),
    "gradient_accumulation_steps": ("ds", "gradient_accumulation_steps"),
    "dtype": ("ds", "bf16.enabled"),
}
_NOTES = {
    "load": " (resuming from it is automatic; to start from other weights use --train.init_from=DIR)",
    "num-layers-per-virtual-pipeline-stage": " (here: the number of chunks per pipeline rank)",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """(the entry's own flags, config overrides as `section.key=value`); ConfigError otherwise."""
    p = argparse.ArgumentParser(
        prog="pretrain_gpt2.py",
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain GPT-2 with tensor, pipeline and ZeRO data parallelism.",
        epilog=config_reference(),
    )
    p.add_argument("--config", default=None, help="YAML config (configs/gpt2/<preset>.yaml)")
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default="configs/ds/zero2.json",
        help="DeepSpeed JSON (batch sizes, ZeRO, precision, clipping)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    for i, item in enumerate(rest):
        hint = habit_hint(item, rest[i + 1] if i + 1 < len(rest) else None)
        if hint:
            raise ConfigError(hint)
    return args, [f"{s}.{k}={v}" for s, k, v, _ in parse_overrides(rest)]


def habit_hint(item: str, following: Optional[str]) -> Optional[str]:
    """The message for a Megatron-LM / nanoGPT flag (`--data-path X`, `--n_layer=4`), else None."""
    m = re.fullmatch(r"--([A-Za-z][\w-]*)(?:=(.*))?", item)
    if m is None:
        return None
    flag, value = m.group(1), m.group(2)
    if value is None and following is not None and not following.startswith("--"):
        value = following
    shown = value if value is not None else "VALUE"
    origin, target = "Megatron-LM's", MEGATRON_FLAGS.get(flag)
    if target is None:
        origin, target = "nanoGPT's", NANOGPT_FLAGS.get(flag)
    if target is None:
        keys = _keys_named(flag.replace("-", "_"))  # --n_layer=4: a key without its section
        if len(keys) != 1:
            return None
        return f"--{flag} is not a flag of this trainer; config keys take their section: --{keys[0]}={shown}"
    if isinstance(target, tuple):
        return (
            f"--{flag} is {origin} flag; here {target[1]} is set in the DeepSpeed JSON "
            f"(--deepspeed_config, e.g. configs/ds/zero2.json)"
        )
    return f"--{flag} is {origin} flag; here it is --{target}={shown}{_NOTES.get(flag, '')}"


def _keys_named(name: str) -> list[str]:
    return [dotted for dotted, _, _, _ in describe_fields() if dotted.split(".", 1)[1] == name]


# -- the reference of every key (--help) ---------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """{field: description}: the comment after each field of the dataclass `cls`."""
    import inspect

    source = inspect.getsource(cls)
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    docs = {}
    for n, line in enumerate(source.splitlines(), 1):
        m = re.match(r" {4}(\w+):", line)
        if m and n in comments:
            docs[m.group(1)] = comments[n]
    return docs


def type_name(tp: Any) -> str:
    """int, float, bool, str, "str|none", "flash|fused_softmax|torch", ..."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + "|none"
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def describe_fields() -> list[tuple[str, str, Any, str]]:
    """(section.key, type, default, description) of every config key, in declaration order."""
    import typing

    rows, cfg = [], Config()
    for section in dataclasses.fields(Config):
        cls = type(getattr(cfg, section.name))
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(cfg, section.name), f.name)
            rows.append((f"{section.name}.{f.name}", type_name(hints[f.name]), default, docs.get(f.name, "")))
    return rows


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def config_reference(width: int = 100) -> str:
    """Every config key, grouped by section: `--section.key=TYPE  description (default: x)`."""
    out = ["config keys (set in the YAML file, or as --section.key=value, which wins):"]
    section = None
    for dotted, tp, default, doc in describe_fields():
        name = dotted.split(".", 1)[0]
        if name != section:
            section = name
            out.append(f"\n  {name}: {(type(getattr(Config(), name)).__doc__ or '').strip()}")
        left = f"    --{dotted}={tp}"
        text = f"{doc} (default: {_shown(default)})" if doc else f"(default: {_shown(default)})"
        lines = textwrap.wrap(text, width - 48) or [""]
        if len(left) > 46:
            out.append(left)
            out += [" " * 48 + ln for ln in lines]
        else:
            out.append(left.ljust(48) + lines[0])
            out += [" " * 48 + ln for ln in lines[1:]]
    out.append("")
    out += textwrap.wrap(
        "DeepSpeed settings live in the --deepspeed_config JSON only: "
        + ", ".join(DS_KEYS)
        + " (global batch = micro batch x gradient accumulation x data-parallel size).",
        width,
    )
    return "\n".join(out)
