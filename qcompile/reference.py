"""An eager reference for a quantized model: same quantize/dequantize, same compute dtype.

``dequantized_model(model, config)`` is what a compiled model should equal up to float
rounding: each ``nn.Linear`` the config quantizes is replaced by one that holds the
packed-then-dequantized weight and computes as the quantized op does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.config import QuantConfig
from qcompile.formats import Scheme


class DequantizedLinear(nn.Module):
    """``F.linear`` with a packed-then-dequantized weight, in the scheme's compute dtype.

    4-bit schemes compute in their ``compute_dtype`` and return the input's dtype, as
    bitsandbytes' ``Linear4bit`` does; other schemes compute in the input's dtype.
    """

    def __init__(self, linear: nn.Linear, scheme: Scheme, name: str):
        super().__init__()
        with torch.no_grad():
            packed = scheme.pack(linear.weight.detach(), name=name)
            self.weight = nn.Parameter(packed.dequantize(linear.weight.dtype), requires_grad=False)
        self.bias = linear.bias
        self.compute_dtype: torch.dtype | None = getattr(scheme, "compute_dtype", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def dequantized_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.Linear`` the config quantizes made a :class:`DequantizedLinear`."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if type(module) is not nn.Linear:
            continue
        scheme, _ = config.scheme_for(name)
        if scheme is None or scheme.unsupported_reason(tuple(module.weight.shape), module.weight.dtype):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = reference.get_submodule(parent_name) if parent_name else reference
        setattr(parent, child, DequantizedLinear(module, scheme, f"{name}.weight"))
    return reference
