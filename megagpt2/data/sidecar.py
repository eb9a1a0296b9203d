"""The tokenizer travels with the data: ``{prefix}.tokenizer/`` next to ``{prefix}.bin/.idx``.

    data/web_text_document.bin, .idx         the tokens (Megatron MMIDIDX, unchanged)
    data/web_text_document.tokenizer/        the tokenizer they were built with
        megagpt2_tokenizer.json              type, vocabulary size, EOD id and token; per file
                                             its name here, sha256 and the path it was copied from
        encoder.json + vocab.bpe | tokenizer.json | x.model      copies of the tokenizer's files

Copies rather than paths: a dataset is often built on one machine and trained on from another,
or after the original tokenizer files have moved; with copies, ``cp prefix.*`` takes everything
the dataset needs, and the sha256 in the sidecar proves the files are the ones the tokens came
from. The files are small next to any real ``.bin`` (GPT-2's two are 1.5 MB). When the copies are
missing but the recorded source path still holds the same bytes, that is used instead.

Preprocessing stages the directory under a temporary name and moves it into place after the old
``.idx`` is removed and before the new one appears (``IndexedDatasetBuilder.finalize``), so a
complete dataset never stands next to another dataset's tokenizer. Datasets without a sidecar
(Megatron's, GPT-NeoX's) read as ``None``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from megagpt2.tokenizer import Tokenizer, TokenizerError, build_tokenizer, check_same_identity
from megagpt2.tokenizer.base import LAYOUT_KEYS
from megagpt2.tokenizer.base import sha256_of_file

SIDECAR_SUFFIX = ".tokenizer"
INFO_FILE = "megagpt2_tokenizer.json"
FORMAT = "megagpt2-dataset-tokenizer"
VERSION = 1
_ROLES = ("vocab_file", "merge_file", "tokenizer_model")  # build_tokenizer's file arguments


def sidecar_dir(prefix: str) -> str:
    """Where the tokenizer of dataset ``prefix`` lives."""
    return prefix + SIDECAR_SUFFIX


def describe_identity(identity: dict) -> str:
    """'HFTokenizer, 21,128 ids, eod 102, tokenizer_model sha256 3f2a9c1e...': for messages."""
    files = ", ".join(f"{role} sha256 {sha[:12]}" for role, sha in sorted(identity.get("files", {}).items()))
    layout = "".join(f", {k} {identity[k]}" for k in LAYOUT_KEYS if identity.get(k) is not None)
    return (f"{identity.get('type')}, {identity.get('vocab_size', 0):,} ids, eod {identity.get('eod')}{layout}"
            + (f", {files}" if files else ""))


@dataclass
class DatasetTokenizer:
    """The tokenizer recorded next to dataset ``prefix`` (its sidecar, already read)."""

    prefix: str
    info: dict[str, Any]

    @property
    def directory(self) -> str:
        return sidecar_dir(self.prefix)

    @property
    def identity(self) -> dict:
        """Same shape as ``Tokenizer.identity()``, so the two compare directly."""
        out = {"type": self.info["type"], "vocab_size": self.info["vocab_size"], "eod": self.info["eod"],
               "files": {role: f["sha256"] for role, f in self.info["files"].items()}}
        out.update({k: self.info[k] for k in LAYOUT_KEYS if self.info.get(k) is not None})  # bos, newline ids
        return out

    def describe(self) -> str:
        return describe_identity(self.identity)

    def file_paths(self) -> dict[str, str]:
        """Role -> path of each file: the copy in the sidecar, else the recorded source if it has
        the recorded sha256; raise naming the missing file and what to do."""
        out = {}
        for role, f in self.info["files"].items():
            copy = os.path.join(self.directory, f["name"])
            source = f.get("source")
            if os.path.isfile(copy):
                out[role] = os.path.abspath(copy)
            elif source and os.path.isfile(source) and sha256_of_file(source) == f["sha256"]:
                out[role] = source
            else:
                raise TokenizerError(
                    f"{copy} is missing (the tokenizer file {role} of dataset {self.prefix}; its "
                    f"source {source!r} is gone or changed). Copy the whole {self.directory}/ "
                    f"directory along with {self.prefix}.bin/.idx, or give the tokenizer explicitly "
                    f"(it is checked against the recorded sha256).")
        return out

    def config(self) -> dict[str, Optional[str]]:
        """``build_tokenizer`` keyword arguments for this tokenizer (also what a run records).

        GPT-2 BPE whose files are byte-identical to the packaged default is recorded as the
        default (no paths), so a checkpoint's stored config does not point into a dataset dir.
        """
        cfg: dict[str, Optional[str]] = {"tokenizer_type": self.info["type"], "vocab_file": None,
                                         "merge_file": None, "tokenizer_model": None,
                                         "eod_token": self.info.get("eod_token")}
        for key in ("bos_token", "newline_token"):  # layout tokens, recorded when set
            if self.info.get(key) is not None:
                cfg[key] = self.info[key]
        if self.info["type"] == "GPT2BPETokenizer" and _is_default_gpt2(self.identity["files"]):
            return cfg
        cfg.update(self.file_paths())
        return cfg

    def build(self) -> Tokenizer:
        """The tokenizer itself, verified against the recorded identity."""
        tokenizer = build_tokenizer(**self.config())  # pyright: ignore[reportArgumentType]  (None: the default)
        check_same_identity(self.identity, tokenizer.identity(), where=f"tokenizer sidecar {self.directory}")
        return tokenizer

    def check(self, tokenizer: Tokenizer, origin: str) -> None:
        """Refuse ``tokenizer`` (``origin`` says where it came from) unless it is this dataset's."""
        theirs = tokenizer.identity()
        if not same_identity(self.identity, theirs):
            raise TokenizerError(
                f"tokenizer mismatch: dataset {self.prefix} was built with {self.describe()}; the "
                f"tokenizer from {origin} is {describe_identity(theirs)}. Drop the tokenizer settings to use the "
                f"dataset's own tokenizer ({self.directory}/), or preprocess the data again with "
                f"this tokenizer.")


def same_identity(a: dict, b: dict) -> bool:
    try:
        check_same_identity(a, b)
    except TokenizerError:
        return False
    return True


def _is_default_gpt2(files: dict[str, str]) -> bool:
    from megagpt2.tokenizer.gpt2_bpe import GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256, default_gpt2_files

    if files != {"vocab_file": GPT2_ENCODER_JSON_SHA256, "merge_file": GPT2_VOCAB_BPE_SHA256}:
        return False
    try:
        default_gpt2_files()
    except TokenizerError:
        return False
    return True


def read_dataset_tokenizer(prefix: str) -> Optional[DatasetTokenizer]:
    """The sidecar of dataset ``prefix``, or None when it has none; a broken one raises."""
    path = os.path.join(sidecar_dir(prefix), INFO_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ValueError(f"format {info.get('format')!r} version {info.get('version')!r}, expected "
                             f"{FORMAT!r} version {VERSION}")
        for key in ("type", "vocab_size", "eod", "files"):
            if key not in info:
                raise ValueError(f"no {key!r}")
        if any(not {"name", "sha256"} <= set(f) for f in info["files"].values()):
            raise ValueError("a file entry lacks 'name' or 'sha256'")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise TokenizerError(f"{path} is not a readable tokenizer sidecar ({e}); delete "
                             f"{sidecar_dir(prefix)}/ and give the tokenizer explicitly, or "
                             f"preprocess the data again") from None
    return DatasetTokenizer(prefix, info)


def dataset_tokenizers(data_path: str) -> list[tuple[str, Optional[DatasetTokenizer]]]:
    """(prefix, sidecar or None) for every prefix of ``data_path`` (a prefix or a blend)."""
    if len(data_path.split()) == 1:  # one prefix: no need for the blend parser (and its torch import)
        prefixes = [data_path.strip()]
    else:
        from megagpt2.data.blending import parse_data_path

        prefixes = [prefix for _, prefix in parse_data_path(data_path)]
    return [(prefix, read_dataset_tokenizer(prefix)) for prefix in prefixes]


# -- writing ---------------------------------------------------------------------------------

def stage_sidecar(prefix: str, tokenizer: Tokenizer, eod_token: Optional[str] = None,
                  built_with: Optional[dict] = None, bos_token: Optional[str] = None,
                  newline_token: Optional[str] = None) -> str:
    """Write the sidecar of ``prefix`` under a temporary name; returns it (see ``commit_sidecar``).

    ``eod_token`` is the end-of-document override the tokenizer was built with (None = its
    default); ``built_with`` (cleaning settings, ...) is recorded for people; ``bos_token`` and
    ``newline_token`` are the layout tokens it was built with (megagpt2.tokenizer).
    """
    tmp = f"{sidecar_dir(prefix)}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        identity, files = tokenizer.identity(), {}
        names: set[str] = set()
        for role, source in tokenizer.files.items():
            name = os.path.basename(source)
            name = f"{role}-{name}" if name in names or name == INFO_FILE else name
            names.add(name)
            shutil.copyfile(source, os.path.join(tmp, name))
            sha = sha256_of_file(os.path.join(tmp, name))
            if sha != identity["files"][role]:
                raise TokenizerError(f"{source} changed while the dataset was being built (sha256 "
                                     f"{identity['files'][role][:12]} -> {sha[:12]}); run again")
            files[role] = {"name": name, "sha256": sha, "source": os.path.abspath(source)}
        info = {"format": FORMAT, "version": VERSION, "type": identity["type"],
                "vocab_size": identity["vocab_size"], "eod": identity["eod"], "eod_token": eod_token,
                "bos_token": bos_token, "newline_token": newline_token,
                **{k: identity[k] for k in LAYOUT_KEYS if k in identity},
                "files": files, "built_with": built_with or {}}
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def commit_sidecar(staged: Optional[str], prefix: str) -> None:
    """Move a staged sidecar into place, replacing the old one (call when no .idx exists);
    ``staged=None`` only removes the old one (the new dataset records no tokenizer)."""
    final = sidecar_dir(prefix)
    if os.path.isdir(final):
        shutil.rmtree(final)
    elif os.path.exists(final):
        os.remove(final)
    if staged is not None:
        os.replace(staged, final)


def discard_sidecar(staged: Optional[str]) -> None:
    if staged and os.path.isdir(staged):
        shutil.rmtree(staged, ignore_errors=True)
