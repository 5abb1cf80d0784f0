"""HQQ (half-quadratic quantization): affine group-wise integers whose zero points are fitted to the weight.

No calibration data. Per group, first the scale: the range ``[a * min, b * max]`` with the smallest
squared error over a grid of shrink factors ``a, b`` (RANGE_SHRINK; HQQ's own solver keeps the
min / max range, its v2 has an opt-in scale search; ``scale_search=False`` skips this), then the zero
point, optimized to minimize an l_p (p < 1) norm of the weight error by half-quadratic splitting
(HQQ's ``optimize_weights_proximal``):

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
from qcompile.formats.blockwise import CHUNK_ELEMENTS
from qcompile.formats.scheme import check_finite, check_type, register_scheme

# HQQ's defaults (hqq/core/optimize.py): the l_p norm of the error, the penalty and its growth per step.
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
# Shrink factors tried for each end of a group's range (36 pairs). On all-MiniLM-L6-v2 at int4 group 64
# (benchmarks/accuracy.py, mean cosine vs fp32): min / max range 0.9676 with the zero solver, 0.9755 with
# this search first; a search over the scale alone (both ends shrunk together) reached 0.974.
RANGE_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85)


@register_scheme
@dataclasses.dataclass(frozen=True)
class HQQ(AffineScheme):
    """Affine integers with a searched range and HQQ-optimized float zero points.

    ``iters``: zero-point solver steps (HQQ's default 20); ``scale_search``: pick each group's range by
    squared error first (see the module docstring).
    """

    kind = "hqq"
    group_size: int = 64
    iters: int = 20
    scale_search: bool = True

    integer_zeros: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sym:
            raise ValueError("hqq.sym: true is not allowed; HQQ fits a zero point per group (allowed: false)")
        check_type(self, "iters", int)
        if not 0 <= self.iters <= 1000:
            raise ValueError(f"hqq.iters: {self.iters} is not allowed; allowed: 0 to 1000")
        check_type(self, "scale_search", bool)

    def fit(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        check_finite(weight, name)
        groups = grouped(weight, self).reshape(-1, weight.shape[1] // self.groups(weight.shape[1]))
        maxq = 2**self.bits - 1
        shrink_factors = RANGE_SHRINK if self.scale_search else (1.0,)
        scale = torch.empty((groups.shape[0], 1), dtype=torch.float32, device=weight.device)
        zero = torch.empty_like(scale)
        # Chunks of groups that stay in cache: the ~40 search passes and ~15 passes per solver step then
        # read cache, not memory (4096x4096 at int4 group 64, 2-core CPU: 12.1 s whole, see the note).
        rows = max(1, CHUNK_ELEMENTS // groups.shape[1])
        for start in range(0, groups.shape[0], rows):
            chunk = groups[start : start + rows]
            chunk_scale, chunk_zero = search_range(chunk, maxq, shrink_factors)
            scale[start : start + rows] = chunk_scale
            zero[start : start + rows] = optimize_zero(chunk, chunk_scale, chunk_zero, maxq, self.iters)
        out_features = weight.shape[0]
        return scale.view(out_features, -1), zero.view(out_features, -1)


def _range_params(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A constant group: any scale represents it; HQQ uses 1 (its inverse scale), kept finite here. The zero
    # is rounded, as HQQ rounds its starting zero at 4 bits (round_zero): on MiniLM int4 g64 the solver
    # started from the rounded zero ends at 0.9755 mean cosine, from the float one at 0.9691.
    scale = torch.where(hi - lo > 1e-8, (hi - lo) / maxq, torch.ones_like(hi))
    return scale, torch.round(-lo / scale)


def search_range(groups: torch.Tensor, maxq: int,
                 shrink_factors: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``groups`` [..., group_size]: the ``(scale, zero)`` [..., 1] of the range
    ``[a * min, b * max]``, ``a, b`` in ``shrink_factors``, whose round-to-nearest integers have the least
    squared error."""
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    best_error = best_lo = best_hi = None
    for a in shrink_factors:
        for b in shrink_factors:
            scale, zero = _range_params(lo * a, hi * b, maxq)
            q = torch.clamp(torch.round(groups / scale + zero), 0, maxq)
            error = (groups - (q - zero) * scale).square().sum(-1, keepdim=True)
            if best_error is None:
                best_error, best_lo, best_hi = error, lo * a, hi * b
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lo = torch.where(better, lo * a, best_lo)
            best_hi = torch.where(better, hi * b, best_hi)
    return _range_params(best_lo, best_hi, maxq)


def shrink(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The proximal operator of ``|x|**p / beta`` (HQQ's generalized soft threshold)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(p - 1) / beta)


def optimize_zero(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  iters: int) -> torch.Tensor:
    """HQQ's zero-point solver on ``groups`` [..., group_size] with fixed ``scale`` [..., 1]: returns the zero
    point of the iteration with the smallest mean absolute error over ``groups`` (HQQ stops at the first
    that is not better; :meth:`HQQ.fit` calls this per chunk of groups, so each chunk stops on its own)."""
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
