"""Which tokenizer a run uses, decided in one place, and a refusal when the sources disagree.

In order: the explicit ``tokenizer.*`` settings; else the tokenizer the data was built with (its
sidecar, megagpt2.data.sidecar; every dataset of a blend must agree); else the one
``train.init_from`` was trained with; else GPT-2 BPE. Whatever is chosen must match every dataset
sidecar exactly and the vocabulary ``train.init_from`` records (its layout tokens may differ: a
fine-tune may wrap documents otherwise), or the run is refused with a message naming both
tokenizers. Datasets without a sidecar (Megatron's) are taken on trust, with a one-line note.

    resolved = resolve_tokenizer(cfg.tokenizer, cfg.data, cfg.train.init_from)
    cfg.tokenizer = resolved.config      # the run (and its checkpoints) record what was used
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from megagpt2.config import DataConfig, TokenizerConfig
from megagpt2.data.sidecar import DatasetTokenizer, dataset_tokenizers, describe_identity, same_identity
from megagpt2.tokenizer import Tokenizer, TokenizerError, build_tokenizer
from megagpt2.tokenizer.base import layout_differences, vocabulary_identity

DEFAULT = TokenizerConfig(tokenizer_type="GPT2BPETokenizer")


@dataclass
class ResolvedTokenizer:
    """The tokenizer, the settings that rebuild it, where it came from, and notes for the user."""

    tokenizer: Tokenizer
    config: TokenizerConfig
    source: str  # "the tokenizer.* settings", "dataset data/x_text_document", ...
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """'tokenizer: HFTokenizer, 21,128 ids, eod 102 (from dataset ...)' plus any notes."""
        ident = self.tokenizer.identity()
        head = (f"tokenizer: {ident['type']}, {ident['vocab_size']:,} ids, eod {ident['eod']} "
                f"(from {self.source})")
        return "\n".join([head, *(f"note: {n}" for n in self.notes)])


def tokenizer_given(cfg: TokenizerConfig) -> bool:
    """True when any tokenizer setting was made (the user chose explicitly)."""
    return any(v is not None for v in asdict(cfg).values())


def checkpoint_tokenizer(path: str) -> tuple[Optional[TokenizerConfig], Optional[dict]]:
    """(settings, identity) of the tokenizer checkpoint ``path`` was trained with.

    A megagpt2 checkpoint records both (settings from its stored config); a Hugging Face
    directory has no identity, and settings only when it holds vocab.json + merges.txt or a
    tokenizer.json. Reads metadata only, never the weights.
    """
    from megagpt2.checkpoint.reshard import resolve
    from megagpt2.checkpoint.store import STATE_FILE

    kind, d = resolve(path)
    if kind == "hf":
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return TokenizerConfig("GPT2BPETokenizer", str(d / "vocab.json"), str(d / "merges.txt")), None
        if (d / "tokenizer.json").is_file():
            return TokenizerConfig("HFTokenizer", tokenizer_model=str(d / "tokenizer.json")), None
        return None, None
    meta = json.loads((Path(d) / STATE_FILE).read_text())
    stored = meta.get("config", {}).get("tokenizer")
    settings = None
    if stored:
        known = {k: v for k, v in stored.items() if k in TokenizerConfig.__dataclass_fields__}
        settings = TokenizerConfig(**known)
        settings.tokenizer_type = settings.tokenizer_type or DEFAULT.tokenizer_type
    return settings, meta.get("tokenizer")


def _build(cfg: TokenizerConfig) -> Tokenizer:
    kwargs: dict[str, Any] = asdict(cfg)
    kwargs["tokenizer_type"] = kwargs["tokenizer_type"] or DEFAULT.tokenizer_type  # files alone: GPT-2 BPE
    return build_tokenizer(**kwargs)


def _dataset_sidecars(data_cfg: DataConfig) -> tuple[list[DatasetTokenizer], list[str]]:
    """(sidecars, prefixes without one) of a pretraining data.path; a blend must agree."""
    if data_cfg.format != "pretrain" or not data_cfg.path.strip():
        return [], []
    found = dataset_tokenizers(data_cfg.path)
    sidecars = [d for _, d in found if d is not None]
    for other in sidecars[1:]:
        if not same_identity(sidecars[0].identity, other.identity):
            raise TokenizerError(
                f"data.path blends datasets built with different tokenizers: {sidecars[0].prefix} "
                f"({sidecars[0].describe()}) and {other.prefix} ({other.describe()}); the datasets of "
                f"a blend must share one tokenizer (their token ids are read by one model)")
    return sidecars, [p for p, d in found if d is None]


def resolve_tokenizer(tokenizer_cfg: TokenizerConfig, data_cfg: DataConfig, init_from: Optional[str] = None,
                      explicit: str = "the tokenizer.* settings") -> ResolvedTokenizer:
    """The run's tokenizer (see the module docstring); raises TokenizerError on a mismatch.

    ``explicit`` names the explicit settings in messages (tools say "the --tokenizer-* flags").
    """
    sidecars, bare = _dataset_sidecars(data_cfg)
    ckpt_cfg, ckpt_identity = checkpoint_tokenizer(init_from) if init_from else (None, None)
    if tokenizer_given(tokenizer_cfg):
        config, source = tokenizer_cfg, explicit
        tokenizer = _build(config)
    elif sidecars:
        config = TokenizerConfig(**sidecars[0].config())  # pyright: ignore[reportArgumentType]  (a TokenizerType)
        source = f"dataset {sidecars[0].prefix}"
        tokenizer = sidecars[0].build()
    elif ckpt_cfg is not None:
        config, source = ckpt_cfg, f"train.init_from {init_from}"
        tokenizer = _build(config)
    else:
        config, source = DEFAULT, "the default (GPT-2 BPE)"
        tokenizer = _build(config)
    for sidecar in sidecars:
        sidecar.check(tokenizer, source)
    notes = []
    if ckpt_identity:
        current = tokenizer.identity()
        if vocabulary_identity(ckpt_identity) != vocabulary_identity(current):
            raise TokenizerError(
                f"tokenizer mismatch: train.init_from {init_from} was trained with "
                f"{describe_identity(ckpt_identity)}; the tokenizer from {source} is "
                f"{describe_identity(current)}. Its embedding rows mean that tokenizer's tokens: use data "
                f"tokenized with it (and drop the tokenizer.* settings), or start from another checkpoint.")
        changed = layout_differences(ckpt_identity, current)
        if changed:  # same vocabulary, other document layout: a fine-tune in a new format
            notes.append(f"train.init_from {init_from} was trained with the same vocabulary in another "
                         f"document layout ({', '.join(changed)}); this run uses the layout from {source}")
    bare = [p for p in bare if os.path.isfile(p + ".idx")]  # a missing dataset fails later, by name
    if bare:
        notes.append(f"{', '.join(bare)} {'has' if len(bare) == 1 else 'have'} no tokenizer sidecar "
                     f"(a Megatron-style dataset?): assuming {tokenizer.type_name} ({source}); if the "
                     f"data was tokenized otherwise, set tokenizer.tokenizer_type and its files")
    resolved_config = TokenizerConfig(**asdict(config))
    resolved_config.tokenizer_type = tokenizer.type_name  # pyright: ignore[reportAttributeAccessIssue]  (a TokenizerType)
    return ResolvedTokenizer(tokenizer, resolved_config, source, notes)


def check_model_vocab(resolved: ResolvedTokenizer, vocab_size: int, init_from: Optional[str] = None) -> None:
    """Refuse a tokenizer with more ids than the model has rows, saying which side is likely wrong."""
    n = resolved.tokenizer.vocab_size
    if n <= vocab_size:
        return
    which = (f"train.init_from {init_from} fixes the model's vocabulary, so the tokenizer is the wrong one"
             if init_from else "if model.vocab_size is right, the tokenizer is the wrong one")
    raise TokenizerError(
        f"the tokenizer ({resolved.tokenizer.type_name} from {resolved.source}) has {n:,} ids but "
        f"model.vocab_size={vocab_size:,}: {which}; give the tokenizer the model and data were built "
        f"with (or drop the tokenizer.* settings to use the dataset's). For a new model on this "
        f"tokenizer, set model.vocab_size={n}.")


def tokenizer_from_flags(args) -> TokenizerConfig:
    """The TokenizerConfig of a namespace filled by ``add_tokenizer_args`` with defaults of None."""
    return TokenizerConfig(*(getattr(args, k, None) for k in TokenizerConfig.__dataclass_fields__))
