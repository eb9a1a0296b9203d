"""Train a SentencePiece (BPE or unigram) or BERT-style WordPiece tokenizer from text or jsonl.

Examples::

    python -m tools.train_tokenizer --input 'corpus/*.jsonl.gz' --json-key text \\
        --vocab-size 32000 --model-type bpe --output-prefix tok/spm32k
    python -m tools.train_tokenizer --type wordpiece --input zh.jsonl --vocab-size 13317 \\
        --output-dir tok/zh

The first writes ``tok/spm32k.model`` (use it with ``--tokenizer-type SentencePieceTokenizer
--tokenizer-model tok/spm32k.model``) and ``tok/spm32k.vocab``. The second writes
``tok/zh/tokenizer.json`` and ``tok/zh/vocab.txt``, the same vocabulary for
``--tokenizer-type HFTokenizer --tokenizer-model tok/zh/tokenizer.json`` and for
``--tokenizer-type BertWordPieceLowerCase --vocab-file tok/zh/vocab.txt`` (and BERT tools):
GPT2-Chinese's kind of vocabulary, one token per Han character, ``##`` pieces for other words,
``[PAD] [UNK] [CLS] [SEP] [MASK]`` as ids 0-4, lower-cased unless ``--no-lowercase`` (then load
vocab.txt as BertWordPieceCase). Characters beyond ``--limit-alphabet`` become [UNK].

Input: ``.jsonl``/``.json`` files (one JSON object per line, text under ``--json-key``) or any
other file as plain text; each may be compressed (.gz, .bz2, .xz, .zst). Every non-empty line of
every document is one training sentence (SentencePiece skips sentences longer than
``--max-sentence-length`` bytes, so whole documents would often be dropped).

SentencePiece defaults make the tokenizer lossless for pretraining: identity normalisation,
whitespace kept as is, and byte fallback (characters outside the vocabulary, newlines included,
become byte pieces), so ``decode(encode(text)) == text``. EOS (``</s>``, id 2) is the
end-of-document token. WordPiece is lossy by design (BERT normalisation; see
megagpt2/tokenizer/wordpiece.py and docs/chinese.md).

Documents go through the same cleaning as in tools/preprocess_data.py, with the same flags
(``--clean`` preset and per-stage flags; default lossless): give both tools the same cleaning
flags so the tokenizer is trained on the text it will tokenize.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from typing import IO, Iterator

import sentencepiece
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.corpus.cleaning import (  # noqa: E402
    CleaningConfig,
    add_cleaning_args,
    clean_documents,
    cleaning_from_args,
)
from megagpt2.corpus.readers import input_kind, open_compressed  # noqa: E402
from megagpt2.tokenizer.wordpiece import SPECIAL_TOKENS, train_wordpiece  # noqa: E402

# SentencePiece-only options and their defaults (refused with --type wordpiece when changed).
SENTENCEPIECE_ONLY = (
    "model_type",
    "character_coverage",
    "byte_fallback",
    "normalization",
    "keep_whitespace",
    "split_digits",
    "user_defined_symbols",
    "max_sentence_length",
)


class InputError(Exception):
    """Bad input data: the message names the file, the line and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--type",
        choices=("sentencepiece", "wordpiece"),
        default="sentencepiece",
        help="sentencepiece (.model) or BERT-style wordpiece (tokenizer.json + vocab.txt)",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="files or globs (quote them): text or jsonl, compressed or not"
    )
    parser.add_argument("--json-key", default="text", help="field holding the text in jsonl")
    parser.add_argument(
        "--format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="auto: jsonl for .jsonl/.json/.ndjson names, else text",
    )
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument(
        "--output-prefix",
        default=None,
        help="sentencepiece: writes PREFIX.model and PREFIX.vocab (directories are created)",
    )
    parser.add_argument("--output-dir", default=None, help="wordpiece: writes DIR/tokenizer.json and DIR/vocab.txt")
    parser.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wordpiece: lower-case and strip accents, as BERT-Chinese (default on)",
    )
    parser.add_argument(
        "--min-frequency", type=int, default=1, help="wordpiece: pieces seen fewer times are not added (default 1)"
    )
    parser.add_argument(
        "--limit-alphabet",
        type=int,
        default=None,
        help="wordpiece: keep at most this many distinct characters, the most frequent (default: all)",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters given their own piece; the rest use bytes",
    )
    parser.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode unknown characters as UTF-8 byte pieces (needs vocab > ~260)",
    )
    parser.add_argument(
        "--normalization", default="identity", choices=("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")
    )
    parser.add_argument(
        "--keep-whitespace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep runs of spaces (else SentencePiece collapses them)",
    )
    parser.add_argument("--split-digits", action="store_true", help="one piece per digit")
    parser.add_argument("--user-defined-symbols", default="", help="comma-separated pieces that are never split")
    parser.add_argument(
        "--max-sentences", type=int, default=10_000_000, help="sample this many sentences for training (0 = use all)"
    )
    parser.add_argument("--max-sentence-length", type=int, default=16384, help="longer sentences (bytes) are skipped")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sentence sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    add_cleaning_args(parser)
    args = parser.parse_args(argv)
    args.cleaning = cleaning_from_args(args)
    if args.vocab_size < 8:
        parser.error(f"--vocab-size must be at least 8, got {args.vocab_size}")
    check_outputs(args, parser)
    args.files = expand_inputs(args.input, parser)
    return args


def check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Each type has its own output flag; options of the other type are refused, not ignored."""
    if args.type == "sentencepiece":
        if args.output_prefix is None or args.output_dir is not None:
            parser.error("--type sentencepiece writes PREFIX.model: give --output-prefix (not --output-dir)")
        return
    if args.output_dir is None or args.output_prefix is not None:
        parser.error(
            "--type wordpiece writes DIR/tokenizer.json and DIR/vocab.txt: give --output-dir (not --output-prefix)"
        )
    changed = [name for name in SENTENCEPIECE_ONLY if getattr(args, name) != parser.get_default(name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        parser.error(f"{flags}: SentencePiece option(s), not used by --type wordpiece")


def expand_inputs(patterns: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Sorted, de-duplicated files of every pattern; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            parser.error(f"--input {pattern!r} matches no file (check the path; quote globs)")
        files.extend(m for m in matches if m not in files)
    return files


def open_text(path: str) -> IO[str]:
    """Open a possibly compressed file as UTF-8 text (bad bytes replaced, not fatal)."""
    return io.TextIOWrapper(open_compressed(path), encoding="utf-8", errors="replace", newline="")


def is_jsonl(path: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    return input_kind(path) == "json"


def iter_documents(path: str, jsonl: bool, json_key: str) -> Iterator[str]:
    """Documents of one file: the ``json_key`` field of each jsonl record, or the whole text."""
    with open_text(path) as f:
        if not jsonl:
            yield f.read()
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e}); is it jsonl?") from e
            if not isinstance(record, dict) or json_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(f"{path}:{number}: no field {json_key!r} (keys: {keys}); set --json-key.")
            if not isinstance(record[json_key], str):
                raise InputError(
                    f"{path}:{number}: field {json_key!r} is "
                    f"{type(record[json_key]).__name__}, not a string; set --json-key."
                )
            yield record[json_key]


class SentenceStream:
    """Iterates training sentences (non-empty lines) of all cleaned documents, with a progress bar.

    SentencePiece may wrap an exception raised inside its sentence iterator into a RuntimeError,
    so the original InputError is also kept in ``self.error`` for the caller to report.
    """

    def __init__(
        self, files: list[str], fmt: str, json_key: str, quiet: bool, cleaning: CleaningConfig | None = None
    ) -> None:
        self.files, self.fmt, self.json_key, self.quiet = files, fmt, json_key, quiet
        self.cleaning = cleaning or CleaningConfig()
        self.sentences = 0
        self.error: InputError | None = None

    def _documents(self, bar: tqdm) -> Iterator[str]:
        for path in self.files:
            yield from iter_documents(path, is_jsonl(path, self.fmt), self.json_key)
            bar.update(1)
            bar.set_postfix(sentences=self.sentences)

    def __iter__(self) -> Iterator[str]:
        bar = tqdm(total=len(self.files), unit="file", desc="reading", disable=self.quiet, file=sys.stderr)
        try:
            for document in clean_documents(self._documents(bar), self.cleaning):
                for line in document.split("\n"):
                    line = line.rstrip("\r")
                    if line.strip():
                        self.sentences += 1
                        yield line
        except InputError as e:
            self.error = e
            raise
        finally:
            bar.close()


def train(args: argparse.Namespace, stream: SentenceStream) -> None:
    """Run the SentencePiece trainer on ``stream`` with the options in ``args``."""
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    sentencepiece.set_random_generator_seed(args.seed)  # sampling is not a TrainerSpec field
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(stream),
        model_prefix=args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        normalization_rule_name=args.normalization,
        remove_extra_whitespaces=not args.keep_whitespace,
        allow_whitespace_only_pieces=args.keep_whitespace,
        split_digits=args.split_digits,
        user_defined_symbols=symbols,
        input_sentence_size=args.max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=args.max_sentence_length,
        num_threads=max(1, args.num_threads),
        minloglevel=0 if args.verbose else 2,
    )


def write_wordpiece(args: argparse.Namespace, stream: SentenceStream) -> int:
    """Train WordPiece on ``stream``; write DIR/tokenizer.json and DIR/vocab.txt atomically."""
    try:
        tok = train_wordpiece(
            stream,
            args.vocab_size,
            lowercase=args.lowercase,
            min_frequency=args.min_frequency,
            limit_alphabet=args.limit_alphabet,
            show_progress=False,
        )
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    if stream.sentences == 0:
        raise SystemExit(
            f"error: no text found in {len(args.files)} input file(s); check --input, --format and --json-key."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(len(vocab))), "WordPiece ids are not 0..n-1"
    json_path = os.path.join(args.output_dir, "tokenizer.json")
    txt_path = os.path.join(args.output_dir, "vocab.txt")
    tok.save(json_path + ".tmp")
    with open(txt_path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token, _ in vocab))
    os.replace(json_path + ".tmp", json_path)
    os.replace(txt_path + ".tmp", txt_path)
    if not args.quiet:
        kind = "BertWordPieceLowerCase" if args.lowercase else "BertWordPieceCase"
        print(
            f"trained wordpiece: {len(vocab)} tokens ({' '.join(SPECIAL_TOKENS)} = ids 0-4) from "
            f"{stream.sentences} sentences in {len(args.files)} file(s)"
        )
        print(
            f"wrote {json_path} (--tokenizer-type HFTokenizer --tokenizer-model {json_path}) and "
            f"{txt_path} (--tokenizer-type {kind} --vocab-file {txt_path}), the same ids"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train and write the tokenizer files; exits non-zero with a message on bad input."""
    args = parse_args(argv)
    if args.type == "wordpiece":
        return write_wordpiece(args, SentenceStream(args.files, args.format, args.json_key, args.quiet, args.cleaning))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    stream = SentenceStream(args.files, args.format, args.json_key, args.quiet, args.cleaning)
    try:
        train(args, stream)
    except InputError as e:  # some SentencePiece builds pass iterator exceptions through
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:
        if stream.error is not None:
            raise SystemExit(f"error: {stream.error}") from None
        if stream.sentences == 0:
            raise SystemExit(
                f"error: no text found in {len(args.files)} input file(s) "
                f"({', '.join(args.files[:3])}{'...' if len(args.files) > 3 else ''}); check "
                "--input, --format and --json-key."
            ) from None
        raise SystemExit(
            f"error: SentencePiece training failed: {str(e).strip()}\n"
            "Check --vocab-size: it must hold 3 special pieces + 256 byte pieces (with "
            "--byte-fallback) + one piece per character kept by --character-coverage, and "
            "SentencePiece refuses sizes larger than this corpus supports."
        ) from None
    if not args.quiet:
        sp = sentencepiece.SentencePieceProcessor(model_file=args.output_prefix + ".model")
        print(
            f"trained {args.model_type} model: {sp.GetPieceSize()} pieces from "
            f"{stream.sentences} sentences in {len(args.files)} file(s)"
        )
        print(
            f"wrote {args.output_prefix}.model and {args.output_prefix}.vocab; eos id {sp.eos_id()} = end of document"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
