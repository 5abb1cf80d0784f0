"""FP4: bitsandbytes' 4-bit float format (1 sign, 2 exponent, 1 mantissa bit)."""

from __future__ import annotations

import dataclasses

from qcompile.formats.fourbit import FourBitScheme
from qcompile.formats.scheme import register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class FP4(FourBitScheme):
    """4-bit float (E2M1 in bitsandbytes' table)."""

    kind = "fp4"
