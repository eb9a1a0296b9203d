"""Any Hugging Face ``tokenizer.json`` (BPE, WordPiece/BERT, unigram) via ``tokenizers``."""

from __future__ import annotations

import json

import tokenizers

from megagpt2.tokenizer.base import Tokenizer, TokenizerError, require_file

# Searched in this order when no end-of-document token is declared: GPT-2/NeoX style, BERT
# WordPiece, T5/Llama style, others. The first one present in the vocabulary is ``eod``.
EOD_CANDIDATES = ("<|endoftext|>", "[SEP]", "</s>", "<eos>")
PAD_CANDIDATES = ("<|padding|>", "[PAD]", "<pad>")
UNK_CANDIDATES = ("[UNK]", "<unk>", "<|unk|>")


class HFTokenizer(Tokenizer):
    """Tokenizer loaded from the ``tokenizer.json`` given by ``--tokenizer-model``.

    ``encode`` calls the library with ``add_special_tokens=False``: a BERT post-processor would
    otherwise wrap every document in [CLS] ... [SEP]; for pretraining the data pipeline appends
    ``eod`` itself. ``eod`` is ``eod_token`` when given, else the first of
    ``<|endoftext|>``, ``[SEP]``, ``</s>``, ``<eos>`` in the vocabulary. ``pad`` is the first of
    ``<|padding|>``, ``[PAD]``, ``<pad>`` present, else None; ``unk`` the model's unknown token.

    A WordPiece model decodes with ``join_wordpieces`` (no spaces next to CJK characters,
    ``##`` pieces joined, English words spaced) instead of the library's decoder, which puts a
    space between every two Chinese characters. Other models use the library's decoder.

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
            tok = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the library raises a bare Exception for parse errors
            hint = _hint_for_non_tokenizer_json(tokenizer_file)
            raise TokenizerError(
                f"{tokenizer_file!r} (--tokenizer-model) is not a Hugging Face tokenizer.json ({e}).{hint}"
            ) from e
        self._setup(tok, f"{tokenizer_file!r} (--tokenizer-model)", eod_token)

    def _setup(self, tok: tokenizers.Tokenizer, where: str, eod_token: str | None) -> None:
        """Read sizes and special ids from a built library tokenizer (``where`` names its file)."""
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.eod = self._find_eod(where, eod_token)
        self.pad = self._first_present(PAD_CANDIDATES)
        model = json.loads(tok.to_str()).get("model", {})
        self._wordpiece_prefix = (
            model.get("continuing_subword_prefix") or "##" if model.get("type") == "WordPiece" else None
        )
        unk = model.get("unk_token")
        if model.get("type") == "Unigram" and model.get("unk_id") is not None:
            self.unk = int(model["unk_id"])
        else:
            self.unk = self._first_present((unk,) if unk else UNK_CANDIDATES)
        self._special = frozenset(int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special)

    def _first_present(self, tokens) -> int | None:
        ids = [self._tok.token_to_id(t) for t in tokens]
        return next((int(i) for i in ids if i is not None), None)

    def _find_eod(self, where: str, eod_token: str | None) -> int:
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        found = self._first_present(candidates)
        if found is not None:
            return found
        added = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())
        raise TokenizerError(
            f"no end-of-document token in {where}: looked for {list(candidates)}. Its "
            f"special/added tokens are {added}; pass one with --eod-token."
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers.Tokenizer`` (for saving a tokenizer.json next to an exported model)."""
        return self._tok

    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` without post-processor special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The library's parallel batch encode."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens included (the base class drops them on request)."""
        if self._wordpiece_prefix is not None:
            from megagpt2.tokenizer.wordpiece import join_wordpieces

            return join_wordpieces([self._tok.id_to_token(i) for i in ids], self._wordpiece_prefix)
        return self._tok.decode(ids, skip_special_tokens=False)

    def _token_to_id(self, token: str) -> int | None:
        token_id = self._tok.token_to_id(token)
        return None if token_id is None else int(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Added tokens marked special ([CLS], [SEP], <|endoftext|> ...)."""
        return self._special


def _hint_for_non_tokenizer_json(path: str) -> str:
    """A what-to-do hint when the file is a GPT-2 vocab.json, a BERT vocab.txt or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return (
            " Pass the tokenizer.json saved by tokenizers.Tokenizer.save(); for a BERT "
            "vocab.txt use --tokenizer-type BertWordPieceLowerCase (or BertWordPieceCase) "
            "--vocab-file vocab.txt."
        )
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        return (
            " It looks like a plain vocabulary (vocab.json/encoder.json): use "
            "--tokenizer-type GPT2BPETokenizer --vocab-file ... --merge-file ... instead."
        )
    return ""
