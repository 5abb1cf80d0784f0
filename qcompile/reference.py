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
from qcompile.passes.names import WeightNames, parameter_aliases, primary_first
from qcompile.passes.plan import decide_weight
from qcompile.passes.sites import float_reader, linear_weight_of


class DequantizedLinear(nn.Module):
    """``F.linear`` with a packed-then-dequantized weight, in the scheme's compute dtype.

    4-bit schemes compute in their ``compute_dtype`` and return the input's dtype, as
    bitsandbytes' ``Linear4bit`` does; other schemes compute in the input's dtype. Under
    ``torch.autocast`` the input is first cast to the autocast dtype, as the compiled op's is.
    ``transposed`` is for a weight stored (in, out), as transformers' ``Conv1D`` (GPT-2) keeps it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme, name: str,
                 transposed: bool = False):
        super().__init__()
        with torch.no_grad():
            w = weight.detach()
            packed = scheme.pack(w.t() if transposed else w, name=name)
            self.weight = nn.Parameter(packed.dequantize(weight.dtype), requires_grad=False)
        self.bias = bias
        self.compute_dtype: torch.dtype | None = getattr(scheme, "compute_dtype", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def dequantized_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A deep copy of ``model`` with every linear the config quantizes made a :class:`DequantizedLinear`.

    Linears are ``nn.Linear`` and transformers' ``Conv1D``. A weight reachable under several
    names (a tied head) is decided on all of them, as the compiled model decides it
    (``passes.plan.decide_weight``).
    """
    reference = copy.deepcopy(model)
    aliases = parameter_aliases(reference)
    # Decide every linear before replacing any: a replaced module would no longer look like a linear
    # to the tied-weight check of a later one.
    chosen = []
    for name, module in reference.named_modules():
        found = linear_weight_of(module)
        if found is None:
            continue
        weight, transposed = found
        weight_names = WeightNames(primary_first(f"{name}.weight", aliases.get(id(weight), [])), reference)
        scheme, _, _ = decide_weight(config, weight_names.module_names, float_reader(weight_names))
        shape = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
        if scheme is not None and scheme.unsupported_reason(shape, weight.dtype) is None:
            chosen.append((name, module, weight, transposed, scheme))
    for name, module, weight, transposed, scheme in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = reference.get_submodule(parent_name) if parent_name else reference
        setattr(parent, child, DequantizedLinear(weight, module.bias, scheme, f"{name}.weight", transposed))
    return reference
