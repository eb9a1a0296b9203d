"""SentencePiece tokenizer (BPE or unigram ``.model`` files, e.g. from tools/train_tokenizer.py)."""

from __future__ import annotations

import sentencepiece

from megagpt2.tokenizer.base import Tokenizer, TokenizerError, require_file


class SentencePieceTokenizer(Tokenizer):
    """Wraps a SentencePiece ``.model`` file given by ``--tokenizer-model``.

    ``eod`` is the model's EOS id (``</s>`` unless trained otherwise), or the id of ``eod_token``
    when one is declared. ``encode`` adds no BOS/EOS. Whether ``decode(encode(x)) == x`` holds
    depends on how the model was trained: tools/train_tokenizer.py defaults to identity
    normalisation, kept whitespace and byte fallback, which make it lossless.

    Args:
        model_file: path of the ``.model`` file.
        eod_token: piece to use as end of document instead of the model's EOS.
        batch_threads: threads SentencePiece uses in ``encode_batch``.
    """

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_file: str | None, eod_token: str | None = None, batch_threads: int = 1) -> None:
        require_file(model_file, "--tokenizer-model", "SentencePiece model file")
        super().__init__({"tokenizer_model": model_file})
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"{model_file!r} (--tokenizer-model) is not a SentencePiece model ({e}). Pass the "
                ".model file written by spm_train or tools/train_tokenizer.py."
            ) from e
        self.vocab_size = int(self._sp.GetPieceSize())
        self.eod = self._find_eod(model_file, eod_token)
        self.pad = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None
        self.unk = int(self._sp.unk_id()) if self._sp.unk_id() >= 0 else None
        self.batch_threads = max(1, int(batch_threads))

    def _find_eod(self, model_file: str, eod_token: str | None) -> int:
        if eod_token is not None:
            token_id = int(self._sp.PieceToId(eod_token))
            # PieceToId answers unk_id for unknown pieces
            if token_id == self._sp.unk_id() and self._sp.IdToPiece(token_id) != eod_token:
                eos = self._sp.IdToPiece(self._sp.eos_id()) if self._sp.eos_id() >= 0 else None
                raise TokenizerError(
                    f"end-of-document token {eod_token!r} (--eod-token) is not a piece of "
                    f"{model_file!r}; its EOS piece is {eos!r}."
                )
            return token_id
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                f"{model_file!r} (--tokenizer-model) has no EOS piece (trained with eos_id=-1); "
                "declare the end-of-document piece with --eod-token."
            )
        return int(self._sp.eos_id())

    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS."""
        return self._sp.Encode(text, out_type=int)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """SentencePiece's own batch encode, on ``batch_threads`` threads."""
        return self._sp.Encode(list(texts), out_type=int, num_threads=self.batch_threads)

    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids``; control pieces (BOS/EOS/PAD) decode to nothing."""
        return self._sp.Decode(ids)

    def _token_to_id(self, token: str) -> int | None:
        token_id = int(self._sp.PieceToId(token))  # unk_id for unknown pieces
        return token_id if self._sp.IdToPiece(token_id) == token else None

    @property
    def special_ids(self) -> frozenset[int]:
        """Control pieces (BOS, EOS, PAD) and the unknown piece."""
        if not hasattr(self, "_special_ids"):
            sp = self._sp
            self._special_ids = frozenset(i for i in range(self.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i))
        return self._special_ids
