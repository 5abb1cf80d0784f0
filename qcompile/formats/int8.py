"""LLM.int8(): row-wise int8 weights, vector-wise int8 activations, fp16 outlier columns."""

from __future__ import annotations

import dataclasses
import math

import torch

from qcompile.formats.packed_int8 import PackedInt8, int8_storage_bytes
from qcompile.formats.scheme import Scheme, check_type, register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class Int8(Scheme):
    """bitsandbytes ``Linear8bitLt``.

    threshold: activation columns with any |x| above it go through a 16-bit matmul (LLM.int8());
        0 means plain vector-wise int8 with no decomposition.
    has_fp16_weight: keep a 16-bit master weight next to the int8 one (for fine-tuning).
    """

    kind = "int8"
    threshold: float = 6.0
    has_fp16_weight: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.threshold, int) and not isinstance(self.threshold, bool):
            object.__setattr__(self, "threshold", float(self.threshold))
        check_type(self, "threshold", float)
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"int8.threshold: {self.threshold} is not allowed; allowed: a finite number >= 0")
        check_type(self, "has_fp16_weight", bool)


    def pack(self, weight: torch.Tensor, name: str = "weight") -> PackedInt8:
        """Row-wise int8 of the float16-cast weight, equal to bitsandbytes ``Int8Params``."""
        return PackedInt8.quantize(weight, self, name)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """``8 + 32/K`` (int8 weight + a float32 per row), ``+ 16`` with the float16 master weight."""
        bits = 8 * int8_storage_bytes(shape) / math.prod(shape)
        return bits + (16 if self.has_fp16_weight else 0)
