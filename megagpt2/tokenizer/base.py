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
    """

    vocab_size: int
    eod: int
    pad: int | None = None

    #: The type name accepted by ``build_tokenizer`` (set by each subclass).
    type_name: str = ""

    def __init__(self, files: dict[str, str]) -> None:
        # role ("vocab_file", "merge_file", "tokenizer_model") -> path; hashed lazily by identity()
        self._files = dict(files)
        self._file_hashes: dict[str, str] | None = None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. No BOS/EOS/CLS/SEP is added: callers append ``eod`` themselves."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; subclasses override with their library's fast batch path."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens are kept, so ``eod`` is visible in decoded samples)."""

    @property
    def files(self) -> dict[str, str]:
        """Role -> path of each file this tokenizer was built from."""
        return dict(self._files)

    def identity(self) -> dict:
        """Fingerprint stored in checkpoints: type, vocab_size, eod and sha256 of each file.

        Files are keyed by role (``vocab_file``, ``merge_file``, ``tokenizer_model``), not by path,
        so the same vocabulary installed in different places gives the same identity.
        """
        if self._file_hashes is None:
            self._file_hashes = {role: sha256_of_file(p) for role, p in self._files.items()}
        return {
            "type": self.type_name,
            "vocab_size": int(self.vocab_size),
            "eod": int(self.eod),
            "files": dict(self._file_hashes),
        }

    def _check_ids(self, ids: Sequence[int]) -> None:
        """Raise a TokenizerError naming the first id outside ``[0, vocab_size)``."""
        for position, token in enumerate(ids):
            if not 0 <= int(token) < self.vocab_size:
                raise TokenizerError(
                    f"cannot decode id {int(token)} at position {position}: the {self.type_name} "
                    f"vocabulary has ids 0..{self.vocab_size - 1}. Was the data tokenized with a "
                    "different tokenizer?"
                )


def check_same_identity(saved: dict, current: dict, where: str = "checkpoint") -> None:
    """Raise a TokenizerError when two tokenizer identities differ, listing every difference.

    Used when resuming: a checkpoint trained with one vocabulary must not silently continue with
    another (the embedding rows would mean different tokens).
    """
    differences = []
    for key in ("type", "vocab_size", "eod"):
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: {where} has {saved.get(key)!r}, now {current.get(key)!r}")
    saved_files, current_files = saved.get("files", {}), current.get("files", {})
    for role in sorted(set(saved_files) | set(current_files)):
        if saved_files.get(role) != current_files.get(role):
            differences.append(
                f"files[{role}] sha256: {where} has {saved_files.get(role)!r}, "
                f"now {current_files.get(role)!r}"
            )
    if differences:
        raise TokenizerError(
            f"tokenizer does not match the one recorded in the {where}:\n  "
            + "\n  ".join(differences)
            + "\nPass the same tokenizer files (--tokenizer-type, --vocab-file, --merge-file, "
            "--tokenizer-model) that the run was started with."
        )
