"""W8A8 dynamic: per-channel symmetric int8 weights, per-token asymmetric int8 activations."""

from __future__ import annotations

import dataclasses

from qcompile.formats.per_channel_int8 import PerChannelInt8Scheme
from qcompile.formats.scheme import register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class W8A8Dynamic(PerChannelInt8Scheme):
    """Activations are quantized at run time per token with a zero point; the matmul accumulates in int32."""

    kind = "w8a8_dynamic"

