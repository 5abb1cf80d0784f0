"""HQQ (half-quadratic quantization): affine group-wise integers whose zero points are fitted to the weight.

No calibration data: per group, the scale stays the min / max one and the zero point is optimized
to minimize an l_p (p < 1) norm of the weight error, by half-quadratic splitting (HQQ's
``optimize_weights_proximal``):

    W_q = clamp(round(W / s + z), 0, 2**bits - 1)     the integers for the current zero point
    W_e = shrink_p(W - (W_q - z) * s)                 the error's sparse part (generalized soft threshold)
    z   = mean over the group of (W_q - (W - W_e) / s)   the zero point that explains the rest

The zero points are float16 (not integers), so the storage is that of ``affine`` at the same bits with a
float16 instead of a ``bits``-wide zero per group (``formats/packed_affine.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qcompile.formats.affine import AffineScheme, grouped
from qcompile.formats.scheme import check_type, register_scheme

# HQQ's defaults (hqq/core/optimize.py): the l_p norm of the error, the penalty and its growth per step.
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01


@register_scheme
@dataclasses.dataclass(frozen=True)
class HQQ(AffineScheme):
    """Affine integers with HQQ-optimized float zero points. ``iters``: solver steps (HQQ's default 20)."""

    kind = "hqq"
    group_size: int = 64
    iters: int = 20

    integer_zeros: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sym:
            raise ValueError("hqq.sym: true is not allowed; HQQ fits a zero point per group (allowed: false)")
        check_type(self, "iters", int)
        if not 0 <= self.iters <= 1000:
            raise ValueError(f"hqq.iters: {self.iters} is not allowed; allowed: 0 to 1000")

    def fit(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name}: weight holds NaN or Inf; cannot quantize")
        groups = grouped(weight, self)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        maxq = 2**self.bits - 1
        # A constant group: any scale represents it; HQQ uses 1 (its inverse scale), kept finite here.
        scale = torch.where(hi - lo > 1e-8, (hi - lo) / maxq, torch.ones_like(hi))
        zero = -lo / scale
        zero = optimize_zero(groups, scale, zero, maxq, self.iters)
        return scale.squeeze(-1), zero.squeeze(-1)


def shrink(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The proximal operator of ``|x|**p / beta`` (HQQ's generalized soft threshold)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(p - 1) / beta)


def optimize_zero(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  iters: int) -> torch.Tensor:
    """HQQ's zero-point solver on ``groups`` [..., group_size] with fixed ``scale`` [..., 1]: returns the zero
    point of the iteration with the smallest mean absolute error (HQQ stops at the first that is not better)."""
    beta = BETA
    best_zero, best_error = zero, float("inf")
    for _ in range(iters):
        q = torch.clamp(torch.round(groups / scale + zero), 0, maxq)
        error = groups - (q - zero) * scale
        mean_error = float(error.abs().mean())
        if mean_error >= best_error:
            break
        best_zero, best_error = zero, mean_error
        residual = shrink(error, beta)
        zero = torch.mean(q - (groups - residual) / scale, dim=-1, keepdim=True)
        beta *= KAPPA
    return best_zero
