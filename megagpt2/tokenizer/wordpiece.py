"""BERT-style WordPiece vocabularies: Chinese-readable decoding, ``vocab.txt`` files, training.

GPT2-Chinese and GPT2-chitchat use a BERT vocabulary (``vocab.txt``): every Han character is its
own token (BERT puts spaces around CJK characters before splitting words), other words are split
into ``##``-continued pieces, and ``[PAD] [UNK] [CLS] [SEP] [MASK]`` are the special tokens.

Decoding such ids is lossy by design (BERT lower-cases, drops accents and collapses whitespace),
and the usual decoder puts a space between every two tokens, so Chinese comes out as
"今 天 天 气". ``join_wordpieces`` writes text the way it is normally written instead; for text
written with these conventions ``decode(encode(text)) == text`` (after lower-casing for the
LowerCase types):

- no space next to a CJK character (Han, kana, CJK and full-width punctuation, — … ·);
- ``##`` pieces join the piece before them;
- one space between other tokens (English words, numbers), except: none before
  ``. , ! ? ; : % ) ] } ' ’ ” - /``, none after ``( [ { ' ‘ “ - / $``, none around ``. , :``
  between two digits (3.14, 1,000, 12:30), and ASCII double quotes alternate between opening
  (no space after) and closing (no space before).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from megagpt2.tokenizer.base import TokenizerError, require_file
from megagpt2.tokenizer.hf_tokenizer import HFTokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# (first, last) code points written without spaces around them.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),  # Han (BERT's list)
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。《》「」【】
    (0x3040, 0x30FF),  # hiragana, katakana
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # full-width forms: ，！？（）：；
    (0x2014, 0x2014),
    (0x2026, 0x2026),
    (0x00B7, 0x00B7),  # —— …… · as Chinese uses them
)
_NO_SPACE_BEFORE = frozenset(".,!?;:%)]}'’”-/")
_NO_SPACE_AFTER = frozenset("([{'‘“-/$")
_DIGIT_SEPARATORS = frozenset(".,:")


def is_cjk(char: str) -> bool:
    """True for a character that Chinese/Japanese text writes without spaces around it."""
    code = ord(char)
    return any(first <= code <= last for first, last in _CJK_RANGES)


def _glued(tail: str, token: str, quote_open: bool) -> bool:
    """Whether ``token`` follows the text ending in ``tail`` without a space (module docstring)."""
    before, first = tail[-1], token[0]
    if is_cjk(before) or is_cjk(first) or first in _NO_SPACE_BEFORE or before in _NO_SPACE_AFTER:
        return True
    if first == '"' or before == '"':  # a closing quote, or the word after an opening one
        return quote_open
    return len(tail) >= 2 and before in _DIGIT_SEPARATORS and tail[-2].isdigit() and first.isdigit()


def join_wordpieces(tokens: Sequence[str], prefix: str = "##") -> str:
    """Text of WordPiece tokens written as people write it (rules in the module docstring)."""
    out: list[str] = []
    tail, quote_open = "", False  # last two characters written; an ASCII " is open
    for token in tokens:
        if not token:
            continue
        if token.startswith(prefix) and len(token) > len(prefix):
            token, glue = token[len(prefix) :], True
        else:
            glue = not tail or _glued(tail, token, quote_open)
        if token == '"':
            quote_open = not quote_open
        out.append(token if glue else " " + token)
        tail = (tail + token)[-2:]
    return "".join(out)


class BertWordPieceTokenizer(HFTokenizer):
    """A BERT ``vocab.txt`` given by ``--vocab-file`` (Megatron's BertWordPieceLowerCase/Case).

    Tokenizes exactly as ``transformers.BertTokenizerFast(vocab_file, do_lower_case=lowercase)``
    with ``add_special_tokens=False``: BERT normalisation (control characters removed,
    whitespace unified, CJK characters split; lower-casing and accent stripping for the LowerCase
    type), BERT pre-tokenization, greedy longest-match WordPiece. The special tokens present in the
    file are matched whole inside text, so a prompt may start with "[CLS]". ``eod`` defaults to
    ``[SEP]``.
    """

    def __init__(self, vocab_file: str | None, lowercase: bool, eod_token: str | None = None) -> None:
        self.type_name = "BertWordPieceLowerCase" if lowercase else "BertWordPieceCase"
        require_file(vocab_file, "--vocab-file", "BERT vocab.txt")
        _check_vocab_txt(vocab_file)
        super(HFTokenizer, self).__init__({"vocab_file": vocab_file})
        tok = tokenizers.Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]"))
        self._setup(bert_pipeline(tok, lowercase), f"{vocab_file!r} (--vocab-file)", eod_token)


def bert_pipeline(tok: tokenizers.Tokenizer, lowercase: bool) -> tokenizers.Tokenizer:
    """Give a WordPiece model BERT's normaliser, pre-tokenizer, decoder and [CLS]/[SEP] template.

    The same settings ``BertTokenizerFast`` uses (``strip_accents`` follows ``lowercase``); the
    specials present in the vocabulary become added special tokens, matched whole inside text.
    """
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is not None and sep is not None:  # for BERT tools; megagpt2 encodes without it
        tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tok


def _check_vocab_txt(path: str) -> None:
    """Refuse files that are not one-token-per-line vocabularies with [UNK], saying what to use."""
    with open(path, encoding="utf-8", errors="replace") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    if tokens and tokens[0].lstrip().startswith("{"):
        raise TokenizerError(
            f"{path!r} (--vocab-file) is JSON, not a BERT vocab.txt: use --tokenizer-type HFTokenizer "
            "--tokenizer-model for a tokenizer.json, or GPT2BPETokenizer for a GPT-2 vocab.json."
        )
    if "[UNK]" not in tokens:
        raise TokenizerError(
            f"{path!r} (--vocab-file) has no [UNK] line ({len(tokens)} lines): a BERT vocab.txt holds "
            "one token per line including [PAD] [UNK] [CLS] [SEP] [MASK]."
        )


def train_wordpiece(
    sentences: Iterable[str],
    vocab_size: int,
    *,
    lowercase: bool = True,
    min_frequency: int = 1,
    limit_alphabet: int | None = None,
    show_progress: bool = False,
) -> tokenizers.Tokenizer:
    """A BERT-style WordPiece tokenizer trained on ``sentences``.

    Each Han character becomes one token (BERT splits CJK characters before the trainer counts
    words), the specials are ids 0-4 in the order ``[PAD] [UNK] [CLS] [SEP] [MASK]``, and the
    result round-trips through ``vocab.txt`` (``save_model``) exactly like a BERT vocabulary.
    ``limit_alphabet`` caps how many distinct characters are kept (the most frequent; the rest
    become ``[UNK]``); by default every character seen is kept.
    """
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=limit_alphabet if limit_alphabet is not None else 1 << 30,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    return bert_pipeline(tok, lowercase)
