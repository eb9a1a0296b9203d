"""Any Hugging Face ``tokenizer.json`` (BPE, WordPiece/BERT, unigram) via ``tokenizers``."""

from __future__ import annotations

import json
from typing import Sequence

import tokenizers

from megagpt2.tokenizer.base import Tokenizer, TokenizerError, require_file

# Searched in this order when no end-of-document token is declared: GPT-2/NeoX style, BERT
# WordPiece, T5/Llama style, others. The first one present in the vocabulary is ``eod``.
EOD_CANDIDATES = ("<|endoftext|>", "[SEP]", "</s>", "<eos>")
PAD_CANDIDATES = ("<|padding|>", "[PAD]", "<pad>")


class HFTokenizer(Tokenizer):
    """Tokenizer loaded from the ``tokenizer.json`` given by ``--tokenizer-model``.

    ``encode`` calls the library with ``add_special_tokens=False``: a BERT post-processor would
    otherwise wrap every document in [CLS] ... [SEP]; for pretraining the data pipeline appends
    ``eod`` itself. ``eod`` is ``eod_token`` when given, else the first of
    ``<|endoftext|>``, ``[SEP]``, ``</s>``, ``<eos>`` in the vocabulary. ``pad`` is the first of
    ``<|padding|>``, ``[PAD]``, ``<pad>`` present, else None.

    Args:
        tokenizer_file: path of ``tokenizer.json``.
        eod_token: token used as end of document.

    ``encode_batch`` uses the library's own thread pool (``RAYON_NUM_THREADS`` limits it).
    """

    type_name = "HFTokenizer"

    def __init__(self, tokenizer_file: str | None, eod_token: str | None = None) -> None:
        require_file(tokenizer_file, "--tokenizer-model", "Hugging Face tokenizer.json")
        super().__init__({"tokenizer_model": tokenizer_file})
        try:
            self._tok = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the library raises a bare Exception for parse errors
            hint = _hint_for_non_tokenizer_json(tokenizer_file)
            raise TokenizerError(
                f"{tokenizer_file!r} (--tokenizer-model) is not a Hugging Face tokenizer.json "
                f"({e}).{hint}"
            ) from e
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eod = self._find_eod(tokenizer_file, eod_token)
        pads = [self._tok.token_to_id(t) for t in PAD_CANDIDATES]
        self.pad = next((int(p) for p in pads if p is not None), None)

    def _find_eod(self, tokenizer_file: str, eod_token: str | None) -> int:
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        added = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())
        raise TokenizerError(
            f"no end-of-document token in {tokenizer_file!r} (--tokenizer-model): looked for "
            f"{list(candidates)}. Its special/added tokens are {added}; pass one with --eod-token."
        )

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without post-processor special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The library's parallel batch encode."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens kept (WordPiece decoding rejoins ``##`` pieces)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=False)


def _hint_for_non_tokenizer_json(path: str) -> str:
    """A what-to-do hint when the file is a GPT-2 vocab.json or not JSON at all."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return " Pass the tokenizer.json saved by tokenizers.Tokenizer.save()."
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        return (
            " It looks like a plain vocabulary (vocab.json/encoder.json): use "
            "--tokenizer-type GPT2BPETokenizer --vocab-file ... --merge-file ... instead."
        )
    return ""
