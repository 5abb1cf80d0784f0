"""Shared packing of the schemes whose weight is per-channel symmetric int8."""

from __future__ import annotations

import dataclasses
import math

import torch

from qcompile.formats.packed_int8 import PackedInt8PerChannel, int8_storage_bytes
from qcompile.formats.scheme import Scheme


@dataclasses.dataclass(frozen=True)
class PerChannelInt8Scheme(Scheme):
    """Weights as ``q = round(w * 127 / absmax(row))`` with ``scale = absmax / 127``; subclasses pick the op."""

    def pack(self, weight: torch.Tensor, name: str = "weight") -> PackedInt8PerChannel:
        """Per-channel symmetric int8: ``q = round(w * 127 / absmax(row))``, ``scale = absmax / 127``."""
        return PackedInt8PerChannel.quantize(weight, self, name)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """``8 + 32/K``: the int8 weight and one float32 scale per output row."""
        return 8 * int8_storage_bytes(shape) / math.prod(shape)
