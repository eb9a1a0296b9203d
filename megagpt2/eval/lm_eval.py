"""lm-evaluation-harness backend: every lm-eval task on a megagpt2 checkpoint.

    import lm_eval
    from megagpt2.eval.lm_eval import MegaGPT2LM

    lm = MegaGPT2LM.from_checkpoint("checkpoints/run", tp=1, batch_size=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
    # or by name (importing this module registers it): model="megagpt2", model_args="load=checkpoints/run"

The three request types follow lm-eval's own `hf` model so the numbers are comparable:

- loglikelihood: context and continuation are tokenized the way lm-eval's TemplateLM does
  (trailing spaces of the context move to the continuation; an empty context is the
  end-of-document token); input = (context + continuation)[-(max_length+1):][:-1].
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens, the first
  one starting with the end-of-document token; the document's log-likelihood is their sum.
- generate_until: greedy unless the request samples (`do_sample`/`temperature`, `top_k`,
  `top_p`), KV-cached, left-padded batches of requests with the same generation settings;
  generation stops at the end-of-document token, at any `until` string (the text is cut before
  it) or after `max_gen_toks`; the context keeps its last max_length - max_gen_toks tokens.

Tensor parallelism: launch one process per TP rank (torchrun); every rank runs every request
(the harness sees one process: rank 0 of world 1) and rank 0 writes the results.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Sequence

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from ..generation import SamplingConfig, generate
from ..model import GPT2
from ..tokenizer import Tokenizer
from .scoring import score_continuations

log = logging.getLogger(__name__)

# generation settings a request may carry (after lm-eval's normalize_gen_kwargs)
GEN_KEYS = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "until", "max_gen_toks"}


@register_model("megagpt2")
class MegaGPT2LM(TemplateLM):
    """A megagpt2 model and its tokenizer as an `lm_eval.api.model.LM`.

    model, tokenizer: from `megagpt2.eval.load_model` (any tp). batch_size: sequences per forward
    pass. max_length: context used (default and upper bound: the model's n_positions).
    max_gen_toks: generation budget when a task sets none (lm-eval's default, 256). seed: sampling
    requests draw with seed + their index in the request list (greedy ones draw nothing).
    """

    def __init__(
        self,
        model: GPT2,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_ctx = model.cfg.n_positions
        if max_length is not None and not 1 < int(max_length) <= n_ctx:
            raise ValueError(f"max_length {max_length} must be in 2..{n_ctx} (the model's context)")
        self.model, self.tok = model, tokenizer
        self._batch_size, self._max_length = int(batch_size), int(max_length or n_ctx)
        self._max_gen_toks, self.seed, self.progress = int(max_gen_toks), int(seed), progress
        self._device = next(model.parameters()).device
        self._rank0 = model.groups.layout.rank == 0

    @classmethod
    def from_checkpoint(
        cls,
        load: str,
        tp: int = 1,
        device: str = "auto",
        dtype: str = "fp32",
        tokenizer: Optional[Tokenizer] = None,
        **kwargs: Any,
    ) -> "MegaGPT2LM":
        """Load any megagpt2 checkpoint, converted dir or Hugging Face GPT-2 dir (see load_model);
        with tp > 1, call it on each of the tp ranks of a torchrun launch."""
        from .loading import start_model

        model, tok, _, _ = start_model(load, int(tp), device, dtype, tokenizer=tokenizer)
        return cls(model, tok, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MegaGPT2LM":
        """`model_args="load=DIR,tp=1,dtype=fp32,batch_size=8,max_length=...,max_gen_toks=..."`."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "load" not in args:
            raise ValueError("model_args needs load=<checkpoint dir> for model=megagpt2")
        if extra.get("batch_size") in ("auto", None):
            extra.pop("batch_size", None)
        if extra.get("device") is None or str(extra.get("device")).startswith("cuda:"):
            extra.pop("device", None)  # the rank's own GPU is picked from LOCAL_RANK
        extra.pop("max_batch_size", None)
        return cls.from_checkpoint(**{**extra, **args})

    # -- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.identity()["type"]

    def get_model_info(self) -> dict:
        """Recorded in the results' config."""
        cfg = self.model.cfg
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()) * self.model.groups.layout.tp,
            "model_dtype": str(next(self.model.parameters()).dtype),
            "tp": self.model.groups.layout.tp,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_positions": cfg.n_positions,
        }

    def tok_encode(
        self,
        string: str,
        add_special_tokens: Optional[bool] = None,
        left_truncate_len: Optional[int] = None,
        **kwargs: Any,
    ) -> list[int]:
        """Our tokenizer's ids: nothing is added (megagpt2 tokenizers add no BOS/CLS/SEP)."""
        ids = self.tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, disable=disable or not self.progress or not self._rank0)

    def _loglikelihood_tokens(
        self, requests: Sequence[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (key, context ids, continuation ids)."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with self._bar(len(pairs), "loglikelihood", disable_tqdm) as bar:
            scores = score_continuations(
                self.model, pairs, self.tok.eod, self.batch_size, self.max_length, progress=bar.update
            )
        out = [(-s.nll, s.greedy) for s in scores]
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole document over disjoint max_length windows."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(w)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations, batched by generation settings and sorted by length."""
        args: list[tuple[Any, ...]] = [req.args for req in requests]  # (context, gen_kwargs) each
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            for members in groups.values():
                settings = self._sampling(args[members[0]][1])
                budget = self.max_length - settings[0].max_new_tokens
                ids = {i: self.tok_encode(args[i][0], left_truncate_len=budget) or [self.tok.eod] for i in members}
                order = sorted(members, key=lambda i: -len(ids[i]))
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    for i, text in zip(batch, self._generate([ids[i] for i in batch], batch, *settings)):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return out  # type: ignore[return-value]

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
        """(sampling settings, stop strings) of one request's gen_kwargs, as lm-eval normalises them."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation settings must be a dict, got {type(gen_kwargs).__name__}: {gen_kwargs!r}")
        kw: dict[str, Any] = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kw) - GEN_KEYS)
        if unknown:
            raise ValueError(
                f"generation settings {unknown} are not supported by megagpt2 "
                f"(supported: {', '.join(sorted(GEN_KEYS))})"
            )
        until = handle_stop_sequences(kw.get("until"), eos=self.tok.decode([self.tok.eod]))
        max_new = int(kw["max_gen_toks"])
        if not 0 < max_new < self.max_length:
            raise ValueError(
                f"max_gen_toks={max_new} must be in 1..{self.max_length - 1} "
                f"(the context of {self.max_length} tokens keeps room for the prompt)"
            )
        temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
        cfg = SamplingConfig(
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=int(kw.get("top_k") or 0),
            top_p=float(kw.get("top_p") or 1.0),
            repetition_penalty=float(kw.get("repetition_penalty") or 1.0),
            stop_token=self.tok.eod,
            seed=self.seed,
        )
        cfg.validate()
        return cfg, until

    def _generate(self, prompts: list[list[int]], index: list[int], cfg: SamplingConfig, until: list[str]) -> list[str]:
        """One left-padded batch: text of each row, cut at the first stop string."""
        stops = [s for s in until if s]

        def stop_fn(row: int, toks: list[int]) -> bool:
            return any(s in self.tok.decode(toks[-64:]) for s in stops)  # a stop ends within the tail

        with torch.no_grad():
            rows = generate(
                self.model,
                prompts,
                cfg,
                pad_id=self.tok.eod,
                seeds=[self.seed + i for i in index],
                stop_fn=stop_fn if stops else None,
            )
        texts = []
        for r in rows:
            body = r[: r.index(self.tok.eod)] if self.tok.eod in r else r
            texts.append(postprocess_generated_text(self.tok.decode(body), until, None))
        return texts
