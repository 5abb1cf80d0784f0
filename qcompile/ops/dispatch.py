"""Which implementation a qcompile op runs: the Triton kernels, the C++ CPU kernels or the torch reference."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

KERNELS = ("auto", "reference", "triton")


def check_kernels(kernels: object) -> str:
    """Return ``kernels`` if it is one of "auto", "reference", "triton"; ValueError naming ``kernels`` otherwise."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: {kernels!r} is not allowed; allowed: {', '.join(KERNELS)}")
    return kernels  # type: ignore[return-value]


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """True for "triton", and for "auto" when ``x`` is on CUDA; False for "reference".

    "triton" on a CPU tensor is only possible through Triton's interpreter, so it needs
    ``TRITON_INTERPRET=1`` (set before the kernels are imported); without it this raises.
    """
    check_kernels(kernels)
    if kernels == "reference":
        return False
    if kernels == "auto":
        return x.is_cuda
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernels: 'triton' was requested for a tensor on {x.device.type}; Triton kernels run on CUDA, "
            "or on CPU only with TRITON_INTERPRET=1 set before qcompile.codegen is imported. "
            "Use kernels='reference' or 'auto' on CPU."
        )
    return True


def use_cpu_kernels(kernels: str, x: torch.Tensor) -> bool:
    """True for "auto" when ``x`` is on the CPU: try the C++ CPU kernels (``qcompile.codegen.cpu_*``), which
    return None where they cannot run (no compiler, an unsupported dtype), and then the torch reference runs."""
    return kernels == "auto" and x.is_cpu


def codegen_function(module: str, function: str) -> Callable[..., Any]:
    """``qcompile.codegen.<module>.<function>``, imported on first use (Triton is optional)."""
    return getattr(_codegen_module(module), function)  # looked up per call: tests replace functions


@functools.cache
def _codegen_module(module: str) -> Any:
    # import_module costs ~1.5 us per call even for a loaded module, and the ops ask on every call.
    return importlib.import_module(f"qcompile.codegen.{module}")
