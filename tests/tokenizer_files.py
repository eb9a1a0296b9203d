"""Small non-GPT-2 tokenizer files that tests build themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

CHINESE = [
    "今天天气很好，我们去公园散步吧？",
    "他说：“明天见。”（然后走了）",
    "你好，世界！我喜欢学习中文。",
    "这本书很有意思，你读过吗？",
    "我们一起吃饭吧：米饭、面条、饺子。",
]


def byte_level_tokenizer_json(path: Path, texts: list[str] | None = None, vocab_size: int = 400) -> str:
    """A byte-level BPE tokenizer.json trained on `texts` (Chinese and English by default).

    Byte-level, so it encodes any text and decodes it back exactly; `<|endoftext|>` is its EOD.
    Its ids differ from GPT-2's, which is what the tokenizer-mismatch tests need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = texts or CHINESE * 4 + ["def f(x):\n    return x  # code\n", "plain English words and more words"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)
