"""Implementation selection and lazy Triton compilation shared by the fused kernels.

Why lazy: `triton.jit` decides at *decoration* time whether a kernel is compiled for the GPU or
run by Triton's CPU interpreter (it reads TRITON_INTERPRET then). The kernel file is therefore
executed on first use, once per interpreter mode (`kernel_module`), so whether the interpreter is
used follows TRITON_INTERPRET at call time, whatever was imported earlier and in whatever order.
Importing `megagpt2.kernels` never imports triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types
from typing import Any

import torch

IMPLS = ("auto", "triton", "torch", "apex")

NO_CUDA_MESSAGE = (
    "Triton kernels need CUDA or TRITON_INTERPRET=1; use model.kernels=torch "
    "(or model.kernels=auto, which picks the torch reference on CPU)"
)

# (module name, interpreter on?) -> kernel module copy. A compile cache, not process state.
_MODULES: dict[tuple[str, bool], types.ModuleType] = {}


def interpret_enabled() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter (read now, not at import)."""
    value = os.environ.get("TRITON_INTERPRET", "0").strip().lower()
    return value in ("1", "true", "yes", "on", "y")


def apex_available() -> bool:
    """True when NVIDIA apex (not the unrelated PyPI package `apex`) is importable."""
    try:
        return importlib.util.find_spec("apex") is not None and (
            importlib.util.find_spec("apex.normalization") is not None
        )
    except (ImportError, ValueError):  # a broken or unrelated `apex` install
        return False


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map a configured implementation to the one that runs on `device`.

    "auto" -> "triton" on CUDA, "torch" (the reference) elsewhere. An explicit "triton" on a
    non-CUDA device needs TRITON_INTERPRET=1; "apex" needs NVIDIA apex and a CUDA device.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {IMPLS}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not interpret_enabled():
        raise RuntimeError(f"{NO_CUDA_MESSAGE} (got a tensor on {device})")
    if impl == "apex":
        if not apex_available():
            raise RuntimeError(
                "model.kernels=apex but NVIDIA apex is not importable; install apex from "
                "github.com/NVIDIA/apex (not the PyPI package 'apex') or use model.kernels=auto"
            )
        if device.type != "cuda":
            raise RuntimeError(f"model.kernels=apex needs CUDA tensors (got {device}); use auto")
    return impl


def triton_interpreting() -> bool:
    """The mode `triton.jit` would pick right now (its own knob where it has one)."""
    import triton  # lazy: see module docstring

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the variable through knobs
    return bool(knobs.runtime.interpret) if knobs is not None else interpret_enabled()


def kernel_module(name: str = "megagpt2.kernels.triton_kernels") -> types.ModuleType:
    """A copy of the kernel module executed in the current interpreter mode, cached per mode.

    Each copy runs the file's `@triton.jit` decorators afresh, so its kernels are compiled or
    interpreted as TRITON_INTERPRET says now. The copies are not put in sys.modules.
    """
    key = (name, triton_interpreting())
    module = _MODULES.get(key)
    if module is None:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise ImportError(f"kernel module {name} not found")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return module


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` runs on Triton's interpreter rather than as compiled code."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Raise the clear error when Triton would be launched on CPU tensors without the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not interpret_enabled():
            raise RuntimeError(f"{NO_CUDA_MESSAGE} (got a tensor on {t.device})")


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU current: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def num_warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel: ~8 elements per thread, 1..16 warps."""
    return min(max(block // 256, 1), 16)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()
