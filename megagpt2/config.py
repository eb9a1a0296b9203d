"""One typed config tree for a run: defaults < YAML file < `--section.key=value` overrides.

Everything a run needs outside DeepSpeed's own settings lives here; DeepSpeed settings (batch
sizes, ZeRO stage, precision, clipping) live only in configs/ds/*.json and are checked against
this tree by the run plan (megagpt2.training.plan). `validate` (megagpt2.config_checks) checks the
fields and their combinations; the plan adds what needs the world size, the files and the
tokenizer. Both run before any process group exists, so a bad value fails fast with a message
that names the field.

The comment after each field is its description: the trainer's `--help` lists every key with
it (a test checks that none is missing). Enumerated settings are `Literal` types, checked on load and by
`validate` in one function (`check_choice`). This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent."""


# The enumerated settings (checked by check_choice).
Attention = Literal["flash", "fused_softmax", "torch"]
Kernels = Literal["auto", "triton", "torch", "apex"]
Schedule = Literal["none", "gpipe", "1f1b", "interleaved"]
Partition = Literal["uniform", "parameters"]
TokenizerType = Literal[
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "HuggingFaceTokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
]
DataFormat = Literal["pretrain", "dialogue", "instruction", "chitchat"]
Verify = Literal["checksum", "size"]
Clean = Literal["none", "web"]  # megagpt2.corpus.cleaning.PRESETS
DecayStyle = Literal["cosine", "linear", "constant"]
OnNonfinite = Literal["stop", "skip"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class ModelConfig:
    """GPT-2 shape and numerics."""

    n_layer: int = 2  # transformer blocks
    n_embd: int = 64  # hidden size
    n_head: int = 4  # attention heads (divides n_embd and, with TP, is divisible by parallel.tp)
    n_positions: int = 1024  # context length
    vocab_size: int = 50257  # real tokens; the embedding is padded (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128  # pad the embedding rows to a multiple of this (x tp)
    dropout: float = 0.1  # embedding and residual dropout
    attn_dropout: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # std of the normal init (residual projections: / sqrt(2 n_layer))
    attention: Attention = "flash"  # attention implementation (docs/kernels.md)
    kernels: Kernels = "auto"  # LayerNorm/softmax kernels; auto = Triton on CUDA
    activation_checkpointing: bool = False  # recompute each block in backward (less memory, ~1/3 more compute)
    compile: bool = False  # torch.compile the model (the blocks, under activation checkpointing)

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up so that the embedding splits evenly; extra rows never win."""
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is whatever is left of the world."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size (stages)
    sequence_parallel: bool = False  # split LayerNorm/dropout activations along the sequence over TP
    schedule: Schedule = "1f1b"  # pipeline schedule (used when pp > 1)
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    partition: Partition = "uniform"  # blocks per stage: equal, or balanced parameters
    timeout_seconds: int = 600  # collective timeout: a dead rank ends the job instead of a hang


@dataclass
class TokenizerConfig:
    """Same flags as tools/preprocess_data.py (names match its --tokenizer-* / --*-token options).

    All unset (the default) means "the tokenizer the data was built with" (its sidecar), else the
    one train.init_from was trained with, else GPT-2 BPE (megagpt2.data.run_tokenizer). Setting
    any field makes the choice explicit; a dataset or checkpoint that records another tokenizer
    is then refused. A resolved run records the tokenizer it used here.
    """

    tokenizer_type: Optional[TokenizerType] = None  # tokenizer kind (tools/preprocess_data.py --tokenizer-type)
    vocab_file: Optional[str] = None  # GPT-2 BPE encoder.json / vocab.json, or a BERT vocab.txt
    merge_file: Optional[str] = None  # GPT-2 BPE vocab.bpe / merges.txt
    tokenizer_model: Optional[str] = None  # SentencePiece .model or Hugging Face tokenizer.json
    eod_token: Optional[str] = None  # default: the type's own (<|endoftext|>, [SEP], ...)
    bos_token: Optional[str] = None  # document start, e.g. [MASK] (GPT2-Chinese), [CLS] (chitchat)
    newline_token: Optional[str] = None  # stands for "\n", e.g. [SEP] (GPT2-Chinese)


@dataclass
class DataConfig:
    """Where samples come from."""

    path: str = ""  # "prefix" or a blend "0.7 prefixA 0.3 prefixB" (prefixes without .bin/.idx)
    split: str = "969,30,1"  # train,valid,test weights
    seq_length: int = 1024  # tokens per sample
    cache_dir: Optional[str] = None  # index caches; default: next to the data
    format: DataFormat = "pretrain"  # .bin/.idx, fine-tuning jsonl (dialogue, instruction) or chitchat text
    num_workers: int = 0  # DataLoader worker processes
    clean: Clean = "none"  # cleaning preset for fine-tuning turns, as tools/preprocess_data.py --clean
    allow_repeat_in_batch: bool = False  # train on a split smaller than one global batch (steps repeat it)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (warmup, then cosine or linear decay)."""

    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # learning rate at the end of the decay
    weight_decay: float = 0.1  # never applied to biases, LayerNorm or embeddings' padding
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 100  # linear warmup from 0
    decay_steps: Optional[int] = None  # steps until min_lr; default: train.steps
    decay_style: DecayStyle = "cosine"  # shape of the decay after warmup


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = 1000  # optimizer steps
    seed: int = 1234  # weights, data order and dropout
    eval_interval: int = 100  # steps between validation runs; 0 = no evaluation
    eval_steps: int = 10  # global batches per validation run
    init_from: Optional[str] = None  # start from these weights: megagpt2 checkpoint dir or Hugging Face GPT-2 dir
    on_nonfinite: OnNonfinite = "stop"  # on a NaN/inf loss or grad norm: stop, or skip the update
    max_skipped_steps: int = 5  # on_nonfinite=skip: stop after this many non-finite steps in a row
    device: Device = "auto"  # auto = every rank's GPU when CUDA is there
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = off


@dataclass
class CheckpointConfig:
    """Where and when to save; resuming from `dir`'s latest is automatic."""

    dir: Optional[str] = "auto"  # checkpoints, metrics.jsonl, loss.png; auto: runs/<YAML file stem>...; none: no saving
    interval: int = 0  # steps between saves; 0 = only at the end and on signals
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    resume: bool = True  # continue from the newest complete checkpoint in dir
    tag: Optional[str] = None  # resume from this checkpoint (e.g. step_00000400) instead of the newest
    fallback: bool = True  # a damaged newest checkpoint: resume from the newest that verifies (false: stop)
    verify: Verify = "checksum"  # how much of each file is checked before resuming (size: sizes only)
    allow_batch_change: bool = False  # resume with another global batch size (the sample position is kept)


@dataclass
class LoggingConfig:
    """What is printed and written."""

    interval: int = 1  # steps between log lines
    tensorboard_dir: Optional[str] = None  # write TensorBoard scalars here
    plot: bool = True  # PNG of the loss curves at the end (in the checkpoint dir)
    sample_prompt: str = ""  # if set, print a sample at the end (chat formats: the user's turn)


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def literal_of(tp: Any) -> Any:
    """The Literal of an enumerated field (also inside Optional[...]), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if typing.get_origin(a) is Literal), None)
    return tp if typing.get_origin(tp) is Literal else None


def check_choice(value: Any, tp: Any, dotted: str) -> Any:
    """The one check of enumerated settings: `value` must be one of the Literal's choices."""
    choices = typing.get_args(tp)
    if value not in choices:
        raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], where)
    if origin is Literal:
        return check_choice(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        return _number(value, tp, where)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _number(value: Any, tp: type, where: str) -> Any:
    what = "an integer" if tp is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) or (tp is float and isinstance(value, float)):
        return tp(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", "")) if tp is int else float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {what}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(
            f"{source}: unknown section {section!r}; valid sections: {', '.join(sections)}"
            f"{_did_you_mean(section, sections)}"
        )
    sub = getattr(cfg, section)
    types_ = field_types(type(sub))
    if key not in types_:
        raise ConfigError(
            f"{source}: unknown key {section}.{key}{_did_you_mean(key, types_, section + '.')}; "
            f"valid keys in {section}: {', '.join(types_)}"
        )
    try:
        setattr(sub, key, _coerce(value, types_[key], f"{section}.{key}"))
    except ConfigError as e:
        raise ConfigError(f"{e} ({source})") from None


def _did_you_mean(word: str, known: Any, prefix: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """The one parser of `--section.key=value` overrides (also `--section.key value` and, in
    lists given to load_config, `section.key=value`) -> [(section, key, value, item)].

    Raises ConfigError naming the first item that is not an override."""
    out, i = [], 0
    while i < len(items):
        item = items[i]
        text = item[2:] if item.startswith("--") else item
        dotted = text.split("=", 1)[0]
        if "." not in dotted or not all(dotted.split(".", 1)):
            raise ConfigError(
                f"unrecognised argument {item!r}: overrides look like --section.key=value, e.g. --train.steps=100"
            )
        if "=" not in text:
            if not item.startswith("--") or i + 1 >= len(items):
                raise ConfigError(f"override {item!r}: expected --section.key=value, e.g. --train.steps=100")
            text, i = f"{text}={items[i + 1]}", i + 1
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".", 1)
        out.append((section, key, value, item))
        i += 1
    return out


def load_config(path: Optional[str] = None, overrides: Optional[Sequence[str]] = None) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides (CLI wins)."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {path} does not exist ({p.absolute()}); pass --config configs/gpt2/<preset>.yaml"
            )
        with p.open() as f:
            try:
                doc = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in doc.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, value, item in parse_overrides(overrides or []):
        _apply(cfg, section, key, _override_value(cfg, section, key, value), f"override {item!r}")
    resolve_run_dir(cfg, path)
    return cfg


def resolve_run_dir(cfg: Config, config_path: Optional[str] = None) -> None:
    """checkpoint.dir=auto becomes runs/<stem of the YAML file> (runs/default without one), so no
    run trains unsaved unless asked to (checkpoint.dir=none). A fine-tune gets -<data.format> and
    a run from other weights -from-<their name>: resuming is automatic, so a fine-tune started with
    the pretraining config must not find (and resume) the pretraining run's checkpoints."""
    if cfg.checkpoint.dir != "auto":
        return
    name = Path(config_path).stem if config_path else "default"
    if cfg.data.format != "pretrain":
        name += f"-{cfg.data.format}"
    if cfg.train.init_from:
        source = Path(os.path.normpath(cfg.train.init_from))
        tag = f"{source.parent.name}-{source.name}" if re.fullmatch(r"step_\d+", source.name) else source.name
        name += f"-from-{tag}"
    cfg.checkpoint.dir = str(Path("runs") / name)


def _override_value(cfg: Config, section: str, key: str, text: str) -> Any:
    """The YAML value of an override; text YAML reads as a list or mapping stays text for a
    string field, so `--tokenizer.bos_token=[MASK]` needs no quotes."""
    value = yaml.safe_load(text) if text.strip() else ""
    sub = getattr(cfg, section, None)
    tp = field_types(type(sub)).get(key) if dataclasses.is_dataclass(sub) else None
    if isinstance(value, (list, dict)) and tp in (str, Optional[str]):
        return text
    return value


def config_from_dict(doc: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. one stored in a checkpoint)."""
    cfg = Config()
    for section, values in doc.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "stored config")
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written next to every checkpoint)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
