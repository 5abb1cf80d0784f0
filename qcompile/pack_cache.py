"""Packed weights, made once per (parameter, scheme) and shared by every graph that uses them.

Graph breaks and recompiles hand the backend the same ``nn.Parameter`` objects,
so keying on the parameter (weakly: the cache never keeps a model alive) lets a
new graph reuse the packed tensors instead of packing, and storing, them again.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from qcompile.formats import PackedWeight, Scheme

_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_LOCK = threading.Lock()


def packed_weight(parameter: torch.Tensor, scheme: Scheme, transposed: bool, name: str) -> PackedWeight:
    """The packed form of ``parameter`` (used as ``parameter.T`` when ``transposed``), packing on first use."""
    key = (scheme, transposed)
    with _LOCK:
        per_param = _PACKED.get(parameter)
        if per_param is not None and key in per_param:
            return per_param[key]
    if getattr(parameter, "_qcompile_released", False):
        raise ValueError(
            f"{name}: its floating-point data was released (release_weights=True) before it was packed "
            f"with {scheme}; compile with the same config or keep the weights"
        )
    with torch.no_grad():
        weight = parameter.detach()
        packed = scheme.pack(weight.t() if transposed else weight, name=name)
    with _LOCK:
        per_param = _PACKED.setdefault(parameter, {})
        return per_param.setdefault(key, packed)


def cached_packed_weights(parameter: torch.Tensor) -> list[PackedWeight]:
    """All packed forms made so far for ``parameter`` (for tests and memory accounting)."""
    with _LOCK:
        return list(_PACKED.get(parameter, {}).values())


def release_parameter(parameter: torch.nn.Parameter) -> None:
    """Drop the parameter's floating-point storage, keeping its shape, dtype and device.

    The data becomes a single NaN broadcast to the original shape, so an eager call
    that still reads it produces NaN rather than a plausible wrong answer.
    """
    if getattr(parameter, "_qcompile_released", False):
        return
    nan = torch.full((1,), float("nan"), dtype=parameter.dtype, device=parameter.device)
    parameter.data = nan.expand(parameter.shape)
    parameter._qcompile_released = True
