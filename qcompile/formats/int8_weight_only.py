"""Per-channel symmetric int8 weight-only quantization (activations stay in float)."""

from __future__ import annotations

import dataclasses

from qcompile.formats.per_channel_int8 import PerChannelInt8Scheme
from qcompile.formats.scheme import register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class Int8WeightOnly(PerChannelInt8Scheme):
    """W = scale[n] * q[n, k], q in [-127, 127], scale = absmax(row) / 127."""

    kind = "int8_weight_only"

