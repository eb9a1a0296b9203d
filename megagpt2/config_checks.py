"""The checks of a config tree's values, run before any process group exists: every enumerated
setting is one of its choices, counts and rates are in range, and the model's shape suits tensor
parallelism and the sequence length. Each problem is a line that names the field; `validate`
raises them all at once.

What needs more than the config (world size, pipeline split, files, tokenizer, DeepSpeed JSON)
is checked by the run plan (megagpt2.training.plan). This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import re

from .config import Config, ConfigError, check_choice, field_types, literal_of


def validate(cfg: Config) -> None:
    """Check every field and their combinations; raise ConfigError naming the field and fix.

    What needs more than the config (world size, pipeline split, files, tokenizer, DeepSpeed
    JSON) is checked by the run plan (megagpt2.training.plan)."""
    errors: list[str] = []
    for section in dataclasses.fields(Config):
        sub = getattr(cfg, section.name)
        for key, tp in field_types(type(sub)).items():
            choice, value = literal_of(tp), getattr(sub, key)
            if choice is not None and value is not None:  # None: unset Optional (tokenizer: the dataset's)
                try:
                    check_choice(value, choice, f"{section.name}.{key}")
                except ConfigError as e:
                    errors.append(str(e))
    errors += _range_errors(cfg) + _shape_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _range_errors(cfg: Config) -> list[str]:
    errors = []
    for dotted in (
        "model.n_layer",
        "model.n_embd",
        "model.n_head",
        "model.n_positions",
        "model.vocab_size",
        "model.make_vocab_size_divisible_by",
        "parallel.tp",
        "parallel.pp",
        "parallel.virtual_stages",
        "data.seq_length",
        "train.steps",
        "logging.interval",
        "parallel.timeout_seconds",
    ):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            errors.append(f"{dotted} must be >= 1, got {getattr(getattr(cfg, section), key)}")
    for dotted in ("model.dropout", "model.attn_dropout"):
        section, key = dotted.split(".")
        if not 0.0 <= getattr(getattr(cfg, section), key) < 1.0:
            errors.append(f"{dotted} must be in [0, 1)")
    if cfg.optim.min_lr > cfg.optim.lr:
        errors.append(f"optim.min_lr={cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}")
    if cfg.train.eval_interval < 0 or cfg.train.eval_steps < 1:
        errors.append("train.eval_interval must be >= 0 (0 = off) and train.eval_steps >= 1")
    if cfg.optim.warmup_steps < 0:
        errors.append("optim.warmup_steps must be >= 0")
    if cfg.checkpoint.keep_last < 1:
        errors.append("checkpoint.keep_last must be >= 1")
    if cfg.checkpoint.dir is not None and not cfg.checkpoint.dir.strip():
        errors.append("checkpoint.dir is empty: give a directory, auto (runs/<YAML file stem>) or none (save nothing)")
    if cfg.train.max_skipped_steps < 1:
        errors.append(
            f"train.max_skipped_steps must be >= 1 (a run must not skip non-finite steps forever), "
            f"got {cfg.train.max_skipped_steps}"
        )
    if cfg.checkpoint.tag is not None and not re.fullmatch(r"step_\d{8}", cfg.checkpoint.tag):
        errors.append(f"checkpoint.tag={cfg.checkpoint.tag!r} is not a checkpoint name such as step_00000400")
    return errors


def _shape_errors(cfg: Config) -> list[str]:
    """Model shape against tensor parallelism and the sequence length."""
    errors, m, par = [], cfg.model, cfg.parallel
    if m.n_head >= 1 and m.n_embd % m.n_head:
        errors.append(f"model.n_head={m.n_head} must divide model.n_embd={m.n_embd} (pick n_embd a multiple of n_head)")
    if par.tp >= 1:
        if m.n_head % par.tp:
            errors.append(f"model.n_head={m.n_head} is not divisible by parallel.tp={par.tp}")
        if m.n_embd % par.tp:
            errors.append(f"model.n_embd={m.n_embd} is not divisible by parallel.tp={par.tp}")
        if m.make_vocab_size_divisible_by >= 1 and m.padded_vocab_size % par.tp:
            errors.append(
                f"padded vocabulary {m.padded_vocab_size} is not divisible by parallel.tp="
                f"{par.tp}; set model.make_vocab_size_divisible_by to a multiple of {par.tp}"
            )
    if par.sequence_parallel and par.tp >= 1 and cfg.data.seq_length % par.tp:
        errors.append(
            f"data.seq_length={cfg.data.seq_length} must be divisible by parallel.tp="
            f"{par.tp} with parallel.sequence_parallel"
        )
    if cfg.data.seq_length > m.n_positions:
        errors.append(f"data.seq_length={cfg.data.seq_length} exceeds model.n_positions={m.n_positions}")
    return errors
