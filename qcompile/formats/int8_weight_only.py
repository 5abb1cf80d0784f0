"""Per-channel symmetric int8 weight-only quantization (activations stay in float)."""

from __future__ import annotations

import dataclasses

from qcompile.formats.scheme import Scheme, register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class Int8WeightOnly(Scheme):
    """W = scale[n] * q[n, k], q in [-127, 127], scale = absmax(row) / 127."""

    kind = "int8_weight_only"
