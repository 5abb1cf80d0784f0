"""NF4: bitsandbytes' 4-bit NormalFloat format (QLoRA)."""

from __future__ import annotations

import dataclasses

from qcompile.formats.fourbit import FourBitScheme
from qcompile.formats.scheme import register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class NF4(FourBitScheme):
    """4-bit NormalFloat: 16 levels at the quantiles of a normal distribution."""

    kind = "nf4"
