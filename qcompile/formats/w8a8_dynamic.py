"""W8A8 dynamic: per-channel symmetric int8 weights, per-token asymmetric int8 activations."""

from __future__ import annotations

import dataclasses

from qcompile.formats.scheme import Scheme, register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class W8A8Dynamic(Scheme):
    """Activations are quantized at run time per token with a zero point; the matmul accumulates in int32."""

    kind = "w8a8_dynamic"
