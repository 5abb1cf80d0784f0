"""quanto-style int4 / int2 weights: affine groups along in_features with a float shift, no optimization.

optimum-quanto's ``MaxOptimizer``: per group ``scale = (max - min) / (2**bits - 1)``, ``shift = -min``, and
``q = clamp(round((w + shift) / scale), 0, 2**bits - 1)``, ``w = q * scale - shift``: the affine form with
the float zero point ``shift / scale`` (stored float16, as HQQ's). quanto's int8 weights are symmetric
per channel: ``int8_weight_only``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qcompile.formats.affine import AffineScheme, grouped
from qcompile.formats.scheme import check_finite, register_scheme


@register_scheme
@dataclasses.dataclass(frozen=True)
class Quanto(AffineScheme):
    """quanto's int4 / int2 weights (see the module docstring); group 128 as quanto uses for K > 128."""

    kind = "quanto"
    integer_zeros: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sym:
            raise ValueError("quanto.sym: true is not allowed; quanto's int4 / int2 weights are affine "
                             "(allowed: false)")

    def fit(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        check_finite(weight, name)
        groups = grouped(weight, self)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = torch.where(hi > lo, (hi - lo) / (2**self.bits - 1), torch.ones_like(hi))
        return scale, -lo / scale
