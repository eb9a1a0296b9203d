"""Write a megagpt2 tokenizer as Hugging Face tokenizer files that encode exactly as megagpt2 does.

`AutoTokenizer.from_pretrained(folder)` then gives the ids `Tokenizer.encode` gives: no BOS,
CLS or SEP is added (megagpt2 adds nothing; documents end with the end-of-document token, which
becomes the tokenizer's eos and bos token). Per kind:

- GPT-2 BPE: vocab.json + merges.txt (with the `#version` header transformers expects) and the
  same vocabulary as tokenizer.json, class GPT2Tokenizer. megagpt2 encodes `<|endoftext|>` inside
  text as ordinary text, so the config sets `split_special_tokens`.
- Hugging Face tokenizer.json (BPE, WordPiece/BERT, unigram): the file with its post-processor
  (the one that wraps text in [CLS] ... [SEP]), truncation and padding removed, class
  PreTrainedTokenizerFast; special tokens in text stay special, as in megagpt2.
- SentencePiece: the .model file as tokenizer.model and a tokenizer.json built from it that
  segments the way SentencePiece does (identity normalisation, as tools/train_tokenizer.py
  trains by default); `check_tokenizer_export` says when AutoTokenizer disagrees.

`check_tokenizer_export` encodes probe texts with both and names the first difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from ..tokenizer import Tokenizer

UNK_CANDIDATES = ("[UNK]", "<unk>", "<|unk|>")
PROBES = (
    "Hello world",
    " leading space, then\ttabs and\n\nblank lines  (two spaces)",
    "Numbers 1234 and 3.14; punctuation: \"quotes\" 'single' -- dashes",
    "naïve café ünïcode 日本語 中文，标点？",
)


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str, model_max_length: int) -> list[str]:
    """Write the tokenizer files into out_dir; returns the names written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = tokenizer.identity()["type"]
    if kind == "GPT2BPETokenizer":
        return _save_gpt2(tokenizer, out, model_max_length)
    if kind == "HFTokenizer":
        return _save_tokenizer_json(tokenizer, out, model_max_length)
    if kind == "SentencePieceTokenizer":
        return _save_sentencepiece(tokenizer, out, model_max_length)
    raise ValueError(
        f"cannot export a {kind} tokenizer to Hugging Face files (known: GPT2BPETokenizer, "
        f"HFTokenizer, SentencePieceTokenizer)"
    )


def _special(tokenizer: Tokenizer) -> dict[str, Optional[str]]:
    eod = tokenizer.decode([tokenizer.eod])
    pad = tokenizer.decode([tokenizer.pad]) if tokenizer.pad is not None else None
    return {"eos_token": eod, "bos_token": eod, "pad_token": pad}


def _save_gpt2(tokenizer: Tokenizer, out: Path, model_max_length: int) -> list[str]:
    from transformers import GPT2Tokenizer

    from ..tokenizer.gpt2_bpe import read_merges, read_vocab_json

    files = tokenizer.files
    vocab, merges = read_vocab_json(files["vocab_file"]), read_merges(files["merge_file"])
    special = _special(tokenizer)
    kwargs: dict[str, Any] = dict(vocab=vocab, merges=merges, unk_token=special["eos_token"], **special)
    hf = GPT2Tokenizer(  # (transformers' hints say str for every special token and list[str] for merges)
        add_prefix_space=False, model_max_length=model_max_length, split_special_tokens=True, **kwargs
    )
    hf.save_pretrained(str(out))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # transformers' slow GPT-2 reader always skips the first line: write the header it expects
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]


def _save_tokenizer_json(tokenizer: Tokenizer, out: Path, model_max_length: int) -> list[str]:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    doc = json.loads(Path(tokenizer.files["tokenizer_model"]).read_text(encoding="utf-8"))
    doc.update(post_processor=None, truncation=None, padding=None)  # encode adds nothing, cuts nothing
    backend = tokenizers.Tokenizer.from_str(json.dumps(doc))
    unk = next((t for t in UNK_CANDIDATES if backend.token_to_id(t) is not None), None)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
        **_special(tokenizer),
    )
    hf.save_pretrained(str(out))
    return ["tokenizer.json", "tokenizer_config.json"]


def _save_sentencepiece(tokenizer: Tokenizer, out: Path, model_max_length: int) -> list[str]:
    """tokenizer.model (the original) and a tokenizer.json that segments as SentencePiece does:
    transformers' own conversion (LlamaTokenizer's) gives the vocabulary and scores, but its
    Metaspace step does not add SentencePiece's dummy prefix before a leading space, so the text
    is normalised as SentencePiece does it (prefix, spaces to U+2581) and split before each U+2581.
    Models trained with a non-identity normalisation rule may still differ: the export check says."""
    import sentencepiece
    from tokenizers import decoders, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_file = tokenizer.files["tokenizer_model"]
    shutil.copyfile(model_file, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}), encoding="utf-8")
    backend = AutoTokenizer.from_pretrained(str(out)).backend_tokenizer
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(model_file)
    dummy = sp.EncodeAsPieces("a")[0].startswith("\u2581")  # trained with add_dummy_prefix
    steps = [normalizers.Prepend("\u2581")] if dummy else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if dummy else [])
    )
    unk = sp.IdToPiece(sp.unk_id()) if sp.unk_id() >= 0 else None
    eod = sp.IdToPiece(tokenizer.eod)  # control pieces decode to "": name them by their piece
    pad = sp.IdToPiece(tokenizer.pad) if tokenizer.pad is not None else None
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        unk_token=unk,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        eos_token=eod,
        bos_token=eod,
        pad_token=pad,
    )
    hf.save_pretrained(str(out))
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"]


def check_tokenizer_export(tokenizer: Tokenizer, out_dir: str, texts: Sequence[str] = PROBES) -> Optional[str]:
    """None when AutoTokenizer on out_dir encodes every text as `tokenizer` does, else what differs."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(out_dir)
    except Exception as e:  # any loader failure is the answer here
        return f"AutoTokenizer cannot load {out_dir}: {type(e).__name__}: {e}"
    for text in texts:
        ours, theirs = tokenizer.encode(text), hf(text)["input_ids"]
        if ours != theirs:
            return f"AutoTokenizer encodes {text!r} as {theirs[:12]}... but megagpt2 as {ours[:12]}..."
    return None
