"""Convert between megagpt2's full (tp=1, pp=1) state dict and Hugging Face GPT2LMHeadModel.

Differences handled here:
- HF's Conv1D stores weights as (in, out); ours are nn.Linear's (out, in): transpose.
- HF prefixes the body with `transformer.` and repeats the tied embedding as `lm_head.weight`.
- Our token embedding is padded to `padded_vocab_size` rows; HF has exactly `vocab_size`.
  Padding rows are dropped on export and zero-filled on import (they are zero in our models).
Sharded checkpoints are gathered to a full state dict first (megagpt2.checkpoint.store).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_NORMS = ("ln_1", "ln_2")


def to_hf_config(cfg: ModelConfig, eod: Optional[int] = None):
    """transformers.GPT2Config with the same shape and numerics; bos = eos = the end-of-document
    id (default: the last vocabulary id, GPT-2's <|endoftext|>)."""
    from transformers import GPT2Config

    eod = cfg.vocab_size - 1 if eod is None else eod
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attn_dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=True,
        bos_token_id=eod,
        eos_token_id=eod,
    )


def model_config_from_hf(hf_config: dict, base: Optional[ModelConfig] = None) -> ModelConfig:
    """Our ModelConfig from an HF config.json dict (other fields from `base`)."""
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"HF config has activation_function={act!r}; GPT-2 uses the tanh GELU (gelu_new)")
    cfg = ModelConfig(**vars(base)) if base is not None else ModelConfig()
    cfg.vocab_size = int(hf_config["vocab_size"])
    cfg.n_positions = int(hf_config.get("n_positions", hf_config.get("n_ctx", 1024)))
    cfg.n_embd, cfg.n_layer, cfg.n_head = int(hf_config["n_embd"]), int(hf_config["n_layer"]), int(hf_config["n_head"])
    cfg.layer_norm_eps = float(hf_config.get("layer_norm_epsilon", 1e-5))
    return cfg


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> GPT2LMHeadModel's (tensors are copies; padding rows dropped)."""
    out: dict[str, torch.Tensor] = {}
    V = cfg.vocab_size
    out["transformer.wte.weight"] = sd["wte.weight"][:V].clone()
    out["transformer.wpe.weight"] = sd["wpe.weight"].clone()
    for i in range(cfg.n_layer):
        for n in _NORMS:
            for t in ("weight", "bias"):
                out[f"transformer.h.{i}.{n}.{t}"] = sd[f"h.{i}.{n}.{t}"].clone()
        for n in _LINEARS:
            out[f"transformer.h.{i}.{n}.weight"] = sd[f"h.{i}.{n}.weight"].t().contiguous()
            out[f"transformer.h.{i}.{n}.bias"] = sd[f"h.{i}.{n}.bias"].clone()
    out["transformer.ln_f.weight"] = sd["ln_f.weight"].clone()
    out["transformer.ln_f.bias"] = sd["ln_f.bias"].clone()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, without the prefix) state dict -> our full one."""

    def get(name: str) -> torch.Tensor:
        for key in (f"transformer.{name}", name):
            if key in hf:
                return hf[key]
        raise KeyError(
            f"Hugging Face state dict has no tensor {name!r} (nor transformer.{name}); "
            f"is this a GPT-2 checkpoint with n_layer={cfg.n_layer}?"
        )

    sd: dict[str, torch.Tensor] = {}
    wte = get("wte.weight")
    if wte.shape[0] != cfg.vocab_size:
        raise ValueError(f"HF wte has {wte.shape[0]} rows but model.vocab_size={cfg.vocab_size}")
    padded = torch.zeros(cfg.padded_vocab_size, wte.shape[1], dtype=wte.dtype)
    padded[: cfg.vocab_size] = wte
    sd["wte.weight"] = padded
    sd["wpe.weight"] = get("wpe.weight").clone()
    for i in range(cfg.n_layer):
        for n in _NORMS:
            for t in ("weight", "bias"):
                sd[f"h.{i}.{n}.{t}"] = get(f"h.{i}.{n}.{t}").clone()
        for n in _LINEARS:
            sd[f"h.{i}.{n}.weight"] = get(f"h.{i}.{n}.weight").t().contiguous()
            sd[f"h.{i}.{n}.bias"] = get(f"h.{i}.{n}.bias").clone()
    sd["ln_f.weight"] = get("ln_f.weight").clone()
    sd["ln_f.bias"] = get("ln_f.bias").clone()
    return sd


def save_hf_dir(sd: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str, tokenizer=None) -> list[str]:
    """Write a directory that `GPT2LMHeadModel.from_pretrained(out_dir)` loads (safetensors).

    With the model's `tokenizer` (a megagpt2 Tokenizer) the folder is complete: tokenizer files
    that `AutoTokenizer` reads and encode as megagpt2 does (interop/hf_tokenizer.py) and
    generation_config.json whose eos (and bos, pad) is the end-of-document id, so
    `model.generate` stops where tools/generate.py stops. Returns the file names written.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(sd, cfg)
    hf.pop("lm_head.weight")  # tied: HF re-ties it on load
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    eod = tokenizer.eod if tokenizer is not None else None
    config = {**to_hf_config(cfg, eod).to_dict(), "architectures": ["GPT2LMHeadModel"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    written = ["model.safetensors", "config.json"]
    if tokenizer is not None:
        from .hf_tokenizer import save_hf_tokenizer

        GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod).save_pretrained(str(out))
        written += ["generation_config.json"] + save_hf_tokenizer(tokenizer, str(out), cfg.n_positions)
    return written


def load_hf_dir(path: str, base: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json; expected a Hugging Face GPT-2 directory")
    cfg = model_config_from_hf(json.loads((d / "config.json").read_text()), base)
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        hf = load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").is_file():
        hf = _load_bin(d / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{d}: neither model.safetensors nor pytorch_model.bin found")
    return cfg, from_hf_state_dict(hf, cfg)


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin with torch's weights-only unpickler and nothing added to its allowlist:
    a state dict is tensors in a dict, so anything else is refused before it can run."""
    import pickle

    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {f}: it holds objects a state dict never contains ({first}); "
            f"convert a trusted copy to model.safetensors instead"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{f} is damaged or truncated ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{f}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    return sd
