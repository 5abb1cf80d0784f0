"""LLM.int8(): row-wise int8 weights, vector-wise int8 activations, fp16 outlier columns."""

from __future__ import annotations

import dataclasses
import math

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
