"""``qcompile.pack(weight, scheme)``: quantize one weight with a scheme."""

from __future__ import annotations

import torch

from qcompile.formats.scheme import PackedWeight, Scheme


def pack(weight: torch.Tensor, scheme: Scheme, name: str = "weight") -> PackedWeight:
    """Quantize ``weight`` [out_features, in_features] with ``scheme`` and return its packed form.

    ``name`` (the parameter's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``) appears in
    every error. Raises ValueError when the scheme cannot take this weight (shape, dtype,
    format limits) or when the weight holds NaN or Inf. Runs on the weight's device, in
    plain torch; the weight is not modified.
    """
    if not isinstance(scheme, Scheme):
        raise ValueError(f"{name}: scheme must be a qcompile Scheme (NF4(), Int8(), ...), got {type(scheme).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    reason = scheme.unsupported_reason(tuple(weight.shape), weight.dtype)
    if reason is not None:
        raise ValueError(f"{name}: cannot pack with {scheme.kind}: {reason}")
    return scheme.pack(weight, name)
