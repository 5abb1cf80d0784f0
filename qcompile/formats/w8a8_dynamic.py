"""W8A8 dynamic: per-channel symmetric int8 weights, per-token asymmetric int8 activations."""

from __future__ import annotations

import dataclasses

import torch

from qcompile.formats.per_channel_int8 import PerChannelInt8Scheme
from qcompile.formats.scheme import register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class W8A8Dynamic(PerChannelInt8Scheme):
    """Activations are quantized at run time per token with a zero point; the matmul accumulates in int32."""

    kind = "w8a8_dynamic"

    @property
    def op(self) -> torch._ops.OpOverload:
        """``torch.ops.qcompile.linear_w8a8_dynamic``."""
        import qcompile.ops  # noqa: F401  (registers the ops; kept out of `import qcompile`)

        return torch.ops.qcompile.linear_w8a8_dynamic.default
