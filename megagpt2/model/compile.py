"""torch.compile for training and evaluation (`model.compile: true`).

Compiled in place (`nn.Module.compile`), so parameter names, the DeepSpeed engine's hooks and the
checkpoint format are unchanged: `model.h.3.attn.c_attn.weight` is still that parameter.

- Without activation checkpointing the whole model is compiled: inductor sees embedding, blocks,
  final LayerNorm and loss as one program and can fuse across block boundaries.
- With activation checkpointing each block is compiled on its own and torch.utils.checkpoint
  wraps the compiled block, so the recomputation in backward runs compiled code too. Every block
  has the same code and, with dynamo's inlining of nn.Modules (parameters become graph inputs),
  shares one compiled graph: the compile cost is that of one block, not of n_layer.

Only calls through `module(...)` run compiled; `module.forward(...)` stays eager.
"""

from __future__ import annotations

import torch.nn as nn


def compile_model(model: nn.Module, activation_checkpointing: bool) -> nn.Module:
    """Compile `model` (a GPT2 or a pipeline stage) in place for `model.compile: true`; returns it."""
    if activation_checkpointing:
        for block in model.get_submodule("h").children():  # the ModuleDict of this model's blocks
            block.compile()
    else:
        model.compile()
    return model
