"""Evaluation: loading a trained model, perplexity, LAMBADA, multiple choice, few-shot prompts.

    model, tokenizer, meta = load_model("checkpoints/run", tp=1, device="cuda")

See docs/evaluation.md for the command line (tools/evaluate.py) and what each number means.
"""

from .loading import DTYPES, ModelLoadError, load_model
from .ppl import count_words, detokenize, ppl_metrics, read_indexed, read_text, sliding_windows, stream_nll
from .scoring import Score, score_continuations, token_nll
from .tasks import (
    evaluate_lambada,
    evaluate_multiple_choice,
    fewshot_prefix,
    join_continuation,
    lambada_examples,
    mc_examples,
    pool_texts,
    read_jsonl,
)

__all__ = [
    "DTYPES",
    "ModelLoadError",
    "load_model",
    "count_words",
    "detokenize",
    "ppl_metrics",
    "read_indexed",
    "read_text",
    "sliding_windows",
    "stream_nll",
    "Score",
    "score_continuations",
    "token_nll",
    "evaluate_lambada",
    "evaluate_multiple_choice",
    "fewshot_prefix",
    "join_continuation",
    "lambada_examples",
    "mc_examples",
    "pool_texts",
    "read_jsonl",
]
