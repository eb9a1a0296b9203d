"""Is there enough data for the run? Checked by the run plan, before any process group exists.

A training split with fewer tokens than one global batch needs cannot fill a step without
repeating itself inside it (a 30-token dataset would train on the same 30 tokens over and over
and exit 0): refused unless `data.allow_repeat_in_batch=true`. A split the run reads more than
`REPEAT_WARNING_EPOCHS` times over is allowed with a warning that says how many epochs. An empty
training split, or a fine-tuning file with no examples, is always refused.

Pretraining counts tokens per prefix of the blend, over the documents `data.split` gives the
training part (the ranges megagpt2.data.gpt_dataset builds its samples from); a blend draws
from each prefix in proportion to its weight, so the epochs are per prefix. Fine-tuning counts
examples (one per sample) with the same split rule as megagpt2.data.finetune.
"""

from __future__ import annotations

import os

from ..config import Config

REPEAT_WARNING_EPOCHS = 4.0  # warn when a run reads its training data more often than this


def data_size_checks(cfg: Config, global_batch: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a run of `cfg.train.steps` steps of `global_batch` samples."""
    if cfg.data.format == "pretrain":
        return _pretrain(cfg, global_batch)
    return _finetune(cfg, global_batch)


def _where(path: str) -> str:
    full = os.path.abspath(path)
    return path if full == path else f"{path} ({full})"


def _pretrain(cfg: Config, global_batch: int) -> tuple[list[str], list[str]]:
    from ..data.blending import parse_data_path, split_ranges
    from ..data.indexed import IndexedDataset

    data, seq = cfg.data, cfg.data.seq_length
    tokens = {}  # prefix -> (weight, training tokens, training documents, all documents)
    for weight, prefix in parse_data_path(data.path):
        if weight > 0:
            indexed = IndexedDataset(prefix)
            start, end = split_ranges(len(indexed), data.split)[0]
            tokens[prefix] = (weight, int(indexed.sizes[start:end].sum(dtype="int64")), end - start, len(indexed))
    total = sum(t for _, t, _, _ in tokens.values())
    if total == 0:
        docs = ", ".join(
            f"{n_train} of {n_all} documents of {_where(p)}" for p, (_, _, n_train, n_all) in tokens.items()
        )
        return [
            f"data.split={data.split!r} leaves no training tokens ({docs}): give the training part a "
            f"larger weight, e.g. data.split=969,30,1"
        ], []
    need = global_batch * seq + 1  # a step reads global_batch windows of seq + 1 tokens, overlapping by 1
    if total < need and not data.allow_repeat_in_batch:
        return [
            f"data.path={data.path}: the training split holds {total:,} tokens but one step needs {need:,} "
            f"(global batch {global_batch} x data.seq_length {seq} + 1): every step would repeat the same "
            f"tokens {need / total:.1f} times. Add data, lower the batch or data.seq_length, or set "
            f"data.allow_repeat_in_batch=true to train on it anyway"
        ], []
    live = sum(w for w, t, _, _ in tokens.values() if t > 0)
    read = cfg.train.steps * global_batch * seq  # tokens the run predicts
    warnings = []
    for prefix, (weight, n, _, _) in tokens.items():
        epochs = (weight / live) * read / n if n else 0.0
        if epochs > REPEAT_WARNING_EPOCHS:
            warnings.append(
                f"the run reads the training split of {_where(prefix)} {epochs:,.1f} times over "
                f"({n:,} tokens; train.steps {cfg.train.steps} x global batch {global_batch} x seq "
                f"{seq}{f' x blend share {weight / live:.2f}' if len(tokens) > 1 else ''}): "
                f"expect it to be memorised"
            )
    return [], warnings


def _finetune(cfg: Config, global_batch: int) -> tuple[list[str], list[str]]:
    from ..data.finetune import count_examples, split_bounds

    data = cfg.data
    try:
        n = count_examples(data.path, data.format)
        train = split_bounds(data.split, n)[1] if n else 0
    except (OSError, ValueError) as e:
        return [f"data.path: {e}"], []
    if n == 0:
        what = (
            "GPT2-chitchat text: dialogues separated by blank lines"
            if data.format == "chitchat"
            else ("one JSON example per line" + (" with at least two utterances" if data.format == "dialogue" else ""))
        )
        return [
            f"data.path={_where(data.path)} holds no {data.format} examples (expected {what}; see docs/finetuning.md)"
        ], []
    if train == 0:
        return [
            f"data.path={_where(data.path)}: {n} examples and data.split={data.split!r} leave none for training"
        ], []
    if train < global_batch and not data.allow_repeat_in_batch:
        return [
            f"data.path={_where(data.path)}: {train} training examples but a global batch takes {global_batch}: "
            f"every step would repeat examples. Add examples, lower the batch, or set "
            f"data.allow_repeat_in_batch=true to train on them anyway"
        ], []
    epochs = cfg.train.steps * global_batch / train
    if epochs > REPEAT_WARNING_EPOCHS:
        return [], [
            f"the run reads the {train:,} training examples of {_where(data.path)} {epochs:,.1f} times "
            f"over (train.steps {cfg.train.steps} x global batch {global_batch}): expect them to be "
            f"memorised"
        ]
    return [], []
