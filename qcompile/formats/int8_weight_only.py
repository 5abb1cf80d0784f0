"""Per-channel symmetric int8 weight-only quantization (activations stay in float)."""

from __future__ import annotations

import dataclasses
import math

import torch

from qcompile.formats.packed_int8 import PackedInt8PerChannel, int8_storage_bytes
from qcompile.formats.scheme import Scheme, register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class Int8WeightOnly(Scheme):
    """W = scale[n] * q[n, k], q in [-127, 127], scale = absmax(row) / 127."""

    kind = "int8_weight_only"

    @property
    def op(self) -> torch._ops.OpOverload:
        """``torch.ops.qcompile.linear_int8_weight_only``."""
        import qcompile.ops  # noqa: F401  (registers the ops; kept out of `import qcompile`)

        return torch.ops.qcompile.linear_int8_weight_only.default

    def pack(self, weight: torch.Tensor, name: str = "weight") -> PackedInt8PerChannel:
        """Per-channel symmetric int8: ``q = round(w * 127 / absmax(row))``, ``scale = absmax / 127``."""
        return PackedInt8PerChannel.quantize(weight, self, name)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """``8 + 32/K``: the int8 weight and one float32 scale per output row."""
        return 8 * int8_storage_bytes(shape) / math.prod(shape)
