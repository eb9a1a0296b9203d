"""Fine-tuning data: dialogues and instruction/response pairs as GPT samples with a loss mask.

Input (jsonl, one example per line; blank lines skipped; or chitchat's text files):
  dialogue     a JSON list of utterances, ["hi", "hello! how are you?", "fine", "good to hear"].
               Speakers alternate: utterances 0, 2, 4 ... are the user's (context), 1, 3, 5 ...
               the bot's (responses, the only tokens with loss). Lines with fewer than two
               utterances have nothing to learn and are skipped (with a warning); a final
               user utterance without an answer is dropped.
  instruction  {"instruction" | "prompt": str, "input": str (optional), "response" | "output": str}:
               a two-turn dialogue, user = instruction (+ "\\n\\n" + input when non-empty),
               bot = response.
  chitchat     GPT2-chitchat's train.txt: one utterance per line, dialogues separated by a blank
               line (LF or CRLF), speakers alternating as in "dialogue". The same examples as
               the dialogue jsonl holding the same utterances, hence the same samples and masks.

Token layout (SEP = the tokenizer's end-of-document token, e.g. <|endoftext|>; START = its
document-start token when one is set (tokenizer.bos_token), else SEP):

    START user_1 SEP bot_1 SEP user_2 SEP bot_2 SEP      (then SEP padding up to seq_length + 1)
                     ~~~~~~~~~     ~~~~~~~~~~~~~        loss mask 1: each bot turn and the SEP
                                                        that ends it, so the model learns to stop
With a BERT vocabulary, bos_token=[CLS] and the default eod [SEP] this is GPT2-chitchat's
"[CLS] u1 [SEP] u2 [SEP] ..." exactly.
The mask is aligned with the tokens (mask[i] = 1 when tokens[i] is a response token); the trainer
uses mask[1:] for the targets tokens[1:]. At inference a chat prompt is the same layout ending
in "SEP" after the user's turn (`chat_prompt`); generation stops at the next SEP.

Too long (more than seq_length + 1 tokens): the context is cut from the left, keeping the last
bot turn whole; if that turn alone does not fit, the sample starts one token before it and the
turn is cut on the right.

Cleaning: every turn goes through the same ``clean_text`` as preprocessing and tokenizer training
(``data.clean``, a preset name; default lossless), so chat data reaches the model as the
pretraining text did. Invalid UTF-8 becomes U+FFFD, as in preprocessing.

Split: examples are shuffled with the seed, then divided by the data.split weights (train, valid,
test). Each dataset repeats whole epochs, reshuffled per epoch with (seed, epoch), until it has
the number of samples the run needs.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..corpus.cleaning import clean_text, cleaning_preset
from ..jsonl import iter_json_lines

FORMATS = ("dialogue", "instruction", "chitchat")


def read_turns(path: str, fmt: str, clean: str = "none") -> list[list[str]]:
    """Examples of a fine-tuning file as lists of turns (user, bot, user, bot ...), each turn
    cleaned with the preset ``clean`` (see megagpt2.corpus.cleaning)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fine-tuning format {fmt!r}; expected one of {FORMATS}")
    cleaning = cleaning_preset(clean)
    out, skipped = [], 0
    for turns in _examples(path, fmt):
        turns = [clean_text(turn, cleaning) for turn in turns]
        if len(turns) < 2:
            skipped += 1
            continue
        out.append(turns[:len(turns) - len(turns) % 2])  # a last user turn has no answer
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} dialogue(s) with fewer than two utterances (no response)")
    if not out:
        raise ValueError(f"{path} has no usable {fmt} examples")
    return out


def count_examples(path: str, fmt: str) -> int:
    """How many examples `read_turns` returns, without cleaning or tokenizing (the run plan's
    check before training; a malformed line raises ValueError naming it, as in `read_turns`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fine-tuning format {fmt!r}; expected one of {FORMATS}")
    return sum(1 for turns in _examples(path, fmt) if len(turns) >= 2)


def _examples(path: str, fmt: str) -> Iterator[list[str]]:
    if fmt == "chitchat":
        yield from read_chitchat(path)
        return
    for n, rec in iter_json_lines(path, "fine-tuning data", "data.path must name a .jsonl file", errors="replace"):
        yield _dialogue(rec, path, n) if fmt == "dialogue" else _instruction(rec, path, n)


def read_chitchat(path: str) -> list[list[str]]:
    """Dialogues of a GPT2-chitchat text file: blocks separated by blank lines, a line per turn
    (invalid UTF-8 becomes U+FFFD, as in the jsonl formats)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fine-tuning data {path} does not exist (data.path must name a "
                                "text file of blank-line-separated dialogues for data.format=chitchat)")
    text = p.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").lstrip("\ufeff")
    return [block.split("\n") for block in re.split(r"\n(?:[ \t]*\n)+", text.strip("\n")) if block.strip()]


def _dialogue(rec, path: str, n: int) -> list[str]:
    if not isinstance(rec, list) or not all(isinstance(u, str) for u in rec):
        raise ValueError(f"{path}:{n}: a dialogue line must be a JSON list of strings (utterances), "
                         f"got {type(rec).__name__}")
    return rec


def _instruction(rec, path: str, n: int) -> list[str]:
    if not isinstance(rec, dict):
        raise ValueError(f"{path}:{n}: an instruction line must be a JSON object")
    prompt = rec.get("instruction", rec.get("prompt"))
    response = rec.get("response", rec.get("output"))
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"{path}:{n}: needs string fields \"instruction\" (or \"prompt\") and "
                         f"\"response\" (or \"output\")")
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"{path}:{n}: \"input\" must be a string")
    return [prompt + ("\n\n" + extra if extra else ""), response]


def encode_dialogue(turn_ids: Sequence[Sequence[int]], sep: int,
                    start: Optional[int] = None) -> tuple[list[int], list[int], int]:
    """(tokens, mask, start of the last bot turn) in the layout of the module docstring;
    `start` is the leading token (default `sep`)."""
    tokens, mask, last = [sep if start is None else start], [0], 0
    for i, ids in enumerate(turn_ids):
        bot = i % 2 == 1
        if bot:
            last = len(tokens)
        tokens += list(ids) + [sep]
        mask += [int(bot)] * (len(ids) + 1)
    return tokens, mask, last


def fit_length(tokens: list[int], mask: list[int], last: int, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut (see module docstring) or pad to exactly `length` tokens."""
    if len(tokens) > length:
        start = len(tokens) - length
        if start >= last:  # the last bot turn does not fit whole: keep its beginning
            start = last - 1
        tokens, mask = tokens[start:start + length], mask[start:start + length]
    n = len(tokens)
    t = np.full(length, pad, dtype=np.int64)
    m = np.zeros(length, dtype=np.int64)
    t[:n], m[:n] = tokens, mask
    return t, m


def chat_prompt(turn_ids: Sequence[Sequence[int]], sep: int, max_tokens: int,
                start: Optional[int] = None) -> list[int]:
    """Tokens asking for the next bot turn after `turn_ids` (user, bot, ..., user), keeping the
    most recent whole turns that fit in `max_tokens`, starting with a user turn as in training."""
    if len(turn_ids) % 2 == 0:
        raise ValueError("a chat prompt ends with a user turn (an odd number of turns)")
    used, n_fit = 1, 0
    for ids in reversed(turn_ids):
        if used + len(ids) + 1 > max_tokens:
            break
        used, n_fit = used + len(ids) + 1, n_fit + 1
    n_fit -= 1 - n_fit % 2  # an odd count: the window starts with a user turn
    if n_fit < 1:
        raise ValueError(f"the last turn ({len(turn_ids[-1])} tokens) does not fit in {max_tokens} tokens")
    tokens, _, _ = encode_dialogue(turn_ids[len(turn_ids) - n_fit:], sep, start)
    return tokens


class FinetuneDataset:
    """`n_items` samples over whole epochs of `examples`, reshuffled per epoch with (seed, epoch)."""

    def __init__(self, tokens: np.ndarray, masks: np.ndarray, n_items: int, seed: int):
        self.tokens, self.masks = tokens, masks  # (N, seq_length + 1)
        n = len(tokens)
        self.n_items = math.ceil(max(n_items, 1) / n) * n
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> dict:
        n = len(self.tokens)
        epoch = int(i) // n
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        j = self._perms[epoch][int(i) % n]
        return {"tokens": self.tokens[j].copy(), "loss_mask": self.masks[j].copy()}


def split_bounds(split: str, n: int) -> list[int]:
    """[0, end_train, end_valid, n] from weights such as "969,30,1" (Megatron's rule)."""
    try:
        w = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"data.split={split!r}: expected comma-separated weights such as 969,30,1") from None
    w = (w + [0.0, 0.0, 0.0])[:3]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"data.split={split!r}: weights must be >= 0 with a positive sum")
    cum = np.cumsum(w) / sum(w)
    return [0] + [int(round(c * n)) for c in cum]


def build_finetune_datasets(data_path: str, format: str, tokenizer, seq_length: int, split: str, seed: int,
                            total_train_samples: int, valid_samples: int, clean: str = "none"):
    """(train, valid): datasets of {"tokens", "loss_mask"} (int64, seq_length + 1); valid is None
    when its split is empty. ``clean`` is the cleaning preset applied to every turn."""
    examples = read_turns(data_path, format, clean)
    flat = tokenizer.encode_batch([u for turns in examples for u in turns])
    L, sep, start = seq_length + 1, tokenizer.eod, getattr(tokenizer, "bos", None)
    tokens, masks, at = [], [], 0
    for turns in examples:
        t, m, last = encode_dialogue(flat[at:at + len(turns)], sep, start)
        at += len(turns)
        t, m = fit_length(t, m, last, L, sep)
        tokens.append(t)
        masks.append(m)
    order = np.random.default_rng(seed).permutation(len(examples))
    tokens, masks = np.stack(tokens)[order], np.stack(masks)[order]
    b = split_bounds(split, len(examples))
    if b[1] == 0:
        raise ValueError(f"{data_path}: {len(examples)} examples and data.split={split!r} leave none for training")
    train = FinetuneDataset(tokens[:b[1]], masks[:b[1]], total_train_samples, seed)
    valid = None
    if b[2] > b[1]:
        valid = FinetuneDataset(tokens[b[1]:b[2]], masks[b[1]:b[2]], valid_samples, seed + 1)
    return train, valid
