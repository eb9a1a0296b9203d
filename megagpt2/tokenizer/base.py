"""Tokenizer base class, the error type and file fingerprints shared by every tokenizer.

Every tokenizer exposes the same small surface (``encode``, ``encode_batch``, ``decode``,
``vocab_size``, ``eod``, ``pad``, ``identity``) so that preprocessing, training and checkpoint code
never need to know which kind of vocabulary they hold.
"""

from __future__ import annotations

import abc
import hashlib
import os
from typing import Sequence


class TokenizerError(ValueError):
    """A tokenizer could not be built or used; the message says what, where and what to do."""


def sha256_of_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (vocabularies can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_file(path: str | None, flag: str, what: str) -> str:
    """Return ``path`` if it names a readable file, else raise a TokenizerError naming the flag.

    ``flag`` is the command-line flag the path came from (for example ``--vocab-file``) so the user
    knows which setting to fix.
    """
    if path is None or path == "":
        raise TokenizerError(f"{what} is required: pass it with {flag}.")
    if not os.path.exists(path):
        raise TokenizerError(f"{what} not found: {path!r} (given by {flag}). Check the path.")
    if not os.path.isfile(path):
        raise TokenizerError(f"{what} is not a regular file: {path!r} (given by {flag}).")
    return path


class Tokenizer(abc.ABC):
    """Abstract tokenizer: text <-> token ids, plus the ids the data pipeline needs.

    Attributes:
        vocab_size: number of real token ids (ids are ``0 .. vocab_size - 1``); the model may pad
            its embedding table beyond this for tensor-parallel divisibility.
        eod: id appended after every document (end of document).
        pad: padding id, or None when the vocabulary has none (GPT-2 has none).
        unk: id of the unknown token (``[UNK]``, ``<unk>``), or None when every text encodes
            without one (byte-level BPE). Generation bans it by default.
        bos: document-start id (``--bos-token``, e.g. GPT2-Chinese's ``[MASK]``), or None.
        newline: id that stands for ``"\\n"`` (``--newline-token``, e.g. GPT2-Chinese's ``[SEP]``),
            or None when newlines are ordinary text. WordPiece treats newlines as spaces, so
            this is how a BERT-style vocabulary keeps line structure.

    Subclasses implement ``_encode``, ``_decode`` (and ``_encode_batch`` when their library has a
    faster batch path), ``_token_to_id`` and ``special_ids``; this class adds the newline mapping,
    dropping special tokens and id checks on top, the same for every kind of vocabulary.
    """

    vocab_size: int
    eod: int
    pad: int | None = None
    unk: int | None = None
    bos: int | None = None
    newline: int | None = None

    #: The type name accepted by ``build_tokenizer`` (set by each subclass).
    type_name: str = ""

    def __init__(self, files: dict[str, str]) -> None:
        # role ("vocab_file", "merge_file", "tokenizer_model") -> path; hashed lazily by identity()
        self._files = dict(files)
        self._file_hashes: dict[str, str] | None = None

    # -- what subclasses provide ------------------------------------------------------------

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` by the underlying library, no special tokens added."""

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(text) for text in texts]

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (already checked to be in range) by the underlying library."""

    @abc.abstractmethod
    def _token_to_id(self, token: str) -> int | None:
        """Id of the single token ``token``, or None when the vocabulary has no such token."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids of special/control tokens (end of document, [CLS], [UNK] ...)."""

    # -- the public surface -----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. No BOS/EOS/CLS/SEP is added: callers add ``bos``/``eod``."""
        return self.encode_batch([text])[0] if self.newline is not None else self._encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, through the library's batch path."""
        if self.newline is None:
            return self._encode_batch(list(texts))
        lines = [text.split("\n") for text in texts]
        flat = iter(self._encode_batch([line for text in lines for line in text]))
        out = []
        for text in lines:
            ids = list(next(flat))
            for _ in text[1:]:
                ids += [self.newline] + next(flat)
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.

        Special tokens are kept by default (so ``eod`` is visible in decoded samples); with
        ``skip_special_tokens`` they are dropped, which is what people should read (generation,
        chat, printed samples). The newline token decodes to ``"\\n"`` either way.
        """
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if skip_special_tokens:
            special = self.special_ids
            ids = [i for i in ids if i not in special or i == self.newline]
        if self.newline is None:
            return self._decode(ids)
        lines, current = [], []
        for i in ids:
            if i == self.newline:
                lines.append(current)
                current = []
            else:
                current.append(i)
        return "\n".join(self._decode(line) for line in lines + [current])

    def token_id(self, token: str, flag: str) -> int:
        """Id of ``token``, or a TokenizerError naming ``flag`` when the vocabulary lacks it."""
        token_id = self._token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{token!r} ({flag}) is not a token of this {self.type_name} vocabulary "
                f"({', '.join(self._files.values()) or 'built-in files'}). Pass a token it has; "
                "BERT-style vocabularies have [PAD] [UNK] [CLS] [SEP] [MASK]."
            )
        return token_id

    @property
    def files(self) -> dict[str, str]:
        """Role -> path of each file this tokenizer was built from."""
        return dict(self._files)

    def identity(self) -> dict:
        """Fingerprint stored in checkpoints: type, vocab_size, eod and sha256 of each file.

        Files are keyed by role (``vocab_file``, ``merge_file``, ``tokenizer_model``), not by path,
        so the same vocabulary installed in different places gives the same identity. ``bos`` and
        ``newline`` are included only when set (they change the ids a text becomes).
        """
        if self._file_hashes is None:
            self._file_hashes = {role: sha256_of_file(p) for role, p in self._files.items()}
        out = {
            "type": self.type_name,
            "vocab_size": int(self.vocab_size),
            "eod": int(self.eod),
            "files": dict(self._file_hashes),
        }
        for key in LAYOUT_KEYS:
            if getattr(self, key) is not None:
                out[key] = int(getattr(self, key))
        return out

    def _check_ids(self, ids: Sequence[int]) -> None:
        """Raise a TokenizerError naming the first id outside ``[0, vocab_size)``."""
        for position, token in enumerate(ids):
            if not 0 <= int(token) < self.vocab_size:
                raise TokenizerError(
                    f"cannot decode id {int(token)} at position {position}: the {self.type_name} "
                    f"vocabulary has ids 0..{self.vocab_size - 1}. Was the data tokenized with a "
                    "different tokenizer?"
                )


#: Optional identity entries: document start and newline ids.
LAYOUT_KEYS = ("bos", "newline")


def vocabulary_identity(identity: dict) -> dict:
    """The part of an identity that fixes what each embedding row means: type, size and files.

    The layout tokens (eod, bos, newline) say how documents are wrapped, not what an id is, so a
    model may be fine-tuned in another layout than it was pretrained in (GPT2-Chinese's
    ``[MASK] ... [CLS]`` articles, then GPT2-chitchat's ``[CLS] u1 [SEP] u2 [SEP]`` dialogues).
    """
    return {k: identity.get(k) for k in ("type", "vocab_size", "files")}


def layout_differences(a: dict, b: dict) -> list[str]:
    """'eod 2 -> 3', 'bos 4 -> 2', ...: how two identities of one vocabulary wrap documents."""
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("eod",) + LAYOUT_KEYS if a.get(k) != b.get(k)]


def check_same_identity(saved: dict, current: dict, where: str = "checkpoint") -> None:
    """Raise a TokenizerError when two tokenizer identities differ, listing every difference.

    Used when resuming: a checkpoint trained with one vocabulary must not silently continue with
    another (the embedding rows would mean different tokens).
    """
    differences = []
    for key in ("type", "vocab_size", "eod") + LAYOUT_KEYS:
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: {where} has {saved.get(key)!r}, now {current.get(key)!r}")
    saved_files, current_files = saved.get("files", {}), current.get("files", {})
    for role in sorted(set(saved_files) | set(current_files)):
        if saved_files.get(role) != current_files.get(role):
            differences.append(
                f"files[{role}] sha256: {where} has {saved_files.get(role)!r}, now {current_files.get(role)!r}"
            )
    if differences:
        raise TokenizerError(
            f"tokenizer does not match the one recorded in the {where}:\n  "
            + "\n  ".join(differences)
            + "\nPass the same tokenizer files and tokens (--tokenizer-type, --vocab-file, "
            "--merge-file, --tokenizer-model, --eod-token, --bos-token, --newline-token) that the "
            "run was started with."
        )
