"""Load a trained model for inference: any megagpt2 checkpoint (any tp it was trained with, loaded
at any tp) or a Hugging Face GPT-2 directory, with the tokenizer that belongs to it.

Tokenizer, in order: the one passed in (built from command-line flags); else the tokenizer
section of the checkpoint's stored config; else, for a Hugging Face directory, its
tokenizer.json when present, or GPT-2 BPE. A megagpt2 checkpoint records its tokenizer's identity
(type, vocabulary size, file hashes): a tokenizer that differs is refused, as is one whose
vocabulary size differs from a Hugging Face model's.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Attention, config_from_dict
from ..model import GPT2
from ..parallel import ParallelLayout, ProcessGroups, build_process_groups
from ..tokenizer import Tokenizer, TokenizerError, build_tokenizer, check_same_identity

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or its tokenizer cannot be loaded, or they do not belong together."""


def default_tokenizer(meta: dict[str, Any], path: str) -> Tokenizer:
    """The tokenizer a checkpoint says it was trained with (see the module docstring)."""
    stored = meta.get("config", {}).get("tokenizer")
    if stored:
        cfg = config_from_dict({"tokenizer": stored}).tokenizer
        cfg.tokenizer_type = cfg.tokenizer_type or "GPT2BPETokenizer"  # unset in a config = GPT-2 BPE
        try:
            return build_tokenizer(**asdict(cfg))
        except TokenizerError as e:
            raise ModelLoadError(
                f"{path}: cannot build the tokenizer stored in the checkpoint ({e}); pass "
                f"--tokenizer-type/--vocab-file/--merge-file/--tokenizer-model"
            ) from e
    if meta.get("source") == "hf":
        tj = Path(path) / "tokenizer.json"
        if tj.is_file():
            return build_tokenizer("HFTokenizer", tokenizer_model=str(tj))
    return build_tokenizer()


def check_tokenizer(meta: dict[str, Any], tokenizer: Tokenizer, vocab_size: int, path: str) -> None:
    """Refuse a tokenizer that does not belong to the checkpoint (wrong ids would mean garbage)."""
    if meta.get("tokenizer"):
        try:
            check_same_identity(meta["tokenizer"], tokenizer.identity(), where=f"checkpoint {path}")
        except TokenizerError as e:
            raise ModelLoadError(str(e)) from e
        exact = False
    else:
        exact = True  # no identity recorded (Hugging Face): at least the vocabulary size must match
    if (exact and tokenizer.vocab_size != vocab_size) or tokenizer.vocab_size > vocab_size:
        raise ModelLoadError(
            f"{path}: the model has a vocabulary of {vocab_size} tokens but the tokenizer "
            f"({tokenizer.identity()['type']}) has {tokenizer.vocab_size}; this checkpoint was trained with "
            f"another vocabulary: pass its tokenizer (--tokenizer-type/--vocab-file/--merge-file/--tokenizer-model)"
        )


def load_model(
    path: str,
    tp: int = 1,
    device: torch.device | str = "cpu",
    tokenizer: Optional[Tokenizer] = None,
    groups: Optional[ProcessGroups] = None,
    dtype: torch.dtype = torch.float32,
    attention: Optional[Attention] = None,
) -> tuple[GPT2, Tokenizer, dict[str, Any]]:
    """(model in eval mode on `device`, tokenizer, checkpoint metadata).

    path: a training checkpoint dir (follows `latest`), a step_* tag, a converted dir or a
    Hugging Face GPT-2 dir. With tp > 1, torch.distributed must be initialised with tp ranks
    (or pass `groups`); every rank gets its shard. Dropout is off; `attention` overrides the path.
    """
    from ..checkpoint.reshard import read_weights, shard_for
    from ..checkpoint.store import CheckpointError

    if not os.path.exists(path):
        raise ModelLoadError(
            f"checkpoint {path} does not exist: pass a megagpt2 checkpoint dir, a step_* "
            f"tag, a converted dir or a Hugging Face GPT-2 dir"
        )
    try:
        meta, full = read_weights(path)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise ModelLoadError(f"cannot read weights from {path}: {e}") from e
    cfg = config_from_dict({"model": meta["config"]["model"]}).model
    cfg.dropout = cfg.attn_dropout = 0.0
    cfg.activation_checkpointing = False
    if attention is not None:
        cfg.attention = attention
    if torch.device(device).type == "cpu":
        cfg.kernels = "auto"  # a GPU-trained config may name Triton/apex kernels: use the torch ones here
    tokenizer = tokenizer or default_tokenizer(meta, path)
    check_tokenizer(meta, tokenizer, cfg.vocab_size, path)
    for what, size in (("n_head", cfg.n_head), ("n_embd", cfg.n_embd), ("padded vocabulary", cfg.padded_vocab_size)):
        if size % tp:
            raise ModelLoadError(f"{path}: {what}={size} cannot be split over tp={tp}; pick a tp that divides it")
    groups = groups or tp_groups(tp)
    if groups.layout.tp != tp:
        raise ValueError(f"tp={tp} but the process groups have tp={groups.layout.tp}")
    with torch.device("meta"):  # no random init: every parameter is overwritten below
        model = GPT2(cfg, groups)
    try:
        local = shard_for(model, full, groups.layout.tp_rank, tp)
    except CheckpointError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    model.load_state_dict(local, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, meta


# -- command-line tools ----------------------------------------------------------------------
def add_model_args(parser) -> None:
    """--load, --tp, --device, --dtype, --attention and the tokenizer flags (default: the
    checkpoint's own tokenizer)."""
    from ..tokenizer import add_tokenizer_args

    g = parser.add_argument_group("model")
    g.add_argument(
        "--load",
        required=True,
        help="megagpt2 checkpoint dir (follows latest), step_* tag, converted dir or Hugging Face GPT-2 dir",
    )
    g.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size; > 1 needs that many ranks (torchrun --nproc_per_node TP ...)",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    g.add_argument(
        "--attention",
        choices=("flash", "fused_softmax", "torch"),
        default=None,
        help="attention implementation (default: the checkpoint's)",
    )
    add_tokenizer_args(parser)
    parser.set_defaults(tokenizer_type=None)  # None = the tokenizer the checkpoint names


def tp_groups(tp: int) -> ProcessGroups:
    """One tensor-parallel group of `tp` ranks (the whole world; one process at tp=1)."""
    import torch.distributed as dist

    if tp == 1 and not dist.is_initialized():
        return ProcessGroups.single()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return build_process_groups(ParallelLayout.for_world(world, tp=tp, rank=rank))


def start_model(
    load: str,
    tp: int = 1,
    device: str = "auto",
    dtype: str = "fp32",
    attention: Optional[Attention] = None,
    tokenizer: Optional[Tokenizer] = None,
) -> tuple[GPT2, Tokenizer, dict[str, Any], ProcessGroups]:
    """Start torch.distributed when launched with several ranks (TP), then `load_model`.

    The one way tools and the lm-evaluation-harness backend get a model: each rank of a
    `torchrun --nproc_per_node TP` launch gets its shard.
    """
    from ..distributed import detect_env, init_distributed, pick_device

    env = detect_env()
    if tp < 1 or env.world_size != tp:
        raise ModelLoadError(
            f"--tp {tp} needs exactly {tp} ranks, but {env.world_size} were started "
            f"(use torchrun --nproc_per_node {tp} for tp > 1)"
        )
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    dev = pick_device(device, env.local_rank)
    if env.world_size > 1:
        init_distributed(env, dev, timeout_seconds=600)
    groups = tp_groups(tp)
    model, tokenizer, meta = load_model(load, tp, dev, tokenizer, groups, DTYPES[dtype], attention)
    return model, tokenizer, meta, groups


def tokenizer_from_flags(args) -> Optional[Tokenizer]:
    """The tokenizer the flags of `add_model_args` name, or None for the checkpoint's own."""
    from ..tokenizer import TOKENIZER_FLAGS, tokenizer_from_args

    if all(getattr(args, flag, None) is None for flag in TOKENIZER_FLAGS):
        return None
    try:
        return tokenizer_from_args(args)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from e


def model_from_args(args) -> tuple[GPT2, Tokenizer, dict[str, Any], ProcessGroups]:
    """`start_model` from the flags of `add_model_args`."""
    return start_model(args.load, args.tp, args.device, args.dtype, args.attention, tokenizer_from_flags(args))
