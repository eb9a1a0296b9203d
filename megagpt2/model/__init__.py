"""GPT-2 built from tensor-parallel layers."""

from .gpt2 import GPT2, LayerNorm

__all__ = ["GPT2", "LayerNorm"]
