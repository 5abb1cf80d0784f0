"""Affine group-wise integer weights: ``W[n, k] = (q[k, n] - zero[g, n]) * scale[g, n]``, ``g = g_idx[k]``.

Settings shared by every method that stores weights this way (round-to-nearest ``affine``, ``hqq``;
GPTQ and AWQ calibrate the same storage), named as transformers' ``GPTQConfig`` names them:

    bits        2, 3, 4 or 8
    group_size  input features per (scale, zero) group: a power of two from 16 to 1024, or -1 for
                one group per output row (per channel)
    sym         symmetric: the zero point is fixed at 2 ** (bits - 1), only the scale is fitted
    compute_dtype  dtype of the dequantized weight and the matmul

The packed form (``packed_affine.py``) is the GPTQ checkpoint layout, so GPTQ checkpoints load as
they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from qcompile.dtypes import FLOAT_DTYPES
from qcompile.formats.int32_words import BITS, run_length
from qcompile.formats.scheme import Scheme, check_dtype, check_finite, check_type, register_scheme


@dataclasses.dataclass(frozen=True)
class AffineScheme(Scheme):
    """Base of the group-wise affine integer schemes; subclasses choose how scales and zeros are fitted."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    compute_dtype: torch.dtype = torch.float32

    dtype_fields: ClassVar = {"compute_dtype": FLOAT_DTYPES}
    # Whether zero points are integers packed like the weights (GPTQ's qzeros) or float16 per group.
    integer_zeros: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_type(self, "bits", int)
        if self.bits not in BITS:
            raise ValueError(f"{self.kind}.bits: {self.bits} is not allowed; allowed: {', '.join(map(str, BITS))}")
        check_type(self, "group_size", int)
        gs = self.group_size
        if gs != -1 and (not 16 <= gs <= 1024 or gs & (gs - 1)):
            raise ValueError(f"{self.kind}.group_size: {gs} is not allowed; allowed: -1 (per channel) or a power "
                             "of two from 16 to 1024")
        check_type(self, "sym", bool)
        check_dtype(self, "compute_dtype")

    def groups(self, in_features: int) -> int:
        """Number of (scale, zero) groups along in_features."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def unsupported_reason(self, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        """Adds the layout's limits: whole groups, and whole int32 runs along both axes."""
        reason = super().unsupported_reason(shape, dtype)
        if reason is not None:
            return reason
        out_features, in_features = shape
        per_run, _ = run_length(self.bits)
        if self.group_size != -1 and in_features % self.group_size:
            return f"in_features {in_features} is not a multiple of group_size {self.group_size}"
        if in_features % per_run:
            return f"in_features {in_features} is not a multiple of {per_run} ({self.bits}-bit values per int32 run)"
        if self.integer_zeros and out_features % per_run:
            return f"out_features {out_features} is not a multiple of {per_run} (the packed zero points' int32 runs)"
        return None

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """``bits`` + per group a float16 scale and a zero (``bits`` packed, or float16) + 32 / out_features
        (the int32 ``g_idx`` entry of each input feature)."""
        out_features, in_features = shape
        groups = self.groups(in_features)
        zero_bits = self.bits if self.integer_zeros else 16
        group_bits = groups * out_features * (16 + zero_bits)
        return self.bits + (group_bits + 32 * in_features) / math.prod(shape)

    def pack(self, weight: torch.Tensor, name: str = "weight"):
        from qcompile.formats.packed_affine import PackedAffine

        scale, zero = self.fit(weight.detach().float(), name)
        return PackedAffine.quantize(weight, self, scale, zero)

    def fit(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` per group, each ``[out_features, groups]`` float32, for a float32 weight."""
        return round_to_nearest_params(weight, self, name)


@register_scheme
@dataclasses.dataclass(frozen=True)
class Affine(AffineScheme):
    """Round-to-nearest affine integers per group (min / max of each group), no calibration."""

    kind = "affine"


def grouped(weight: torch.Tensor, scheme: AffineScheme) -> torch.Tensor:
    """``[out_features, groups, group_size]`` view of a ``[out_features, in_features]`` weight."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features, scheme.groups(in_features), -1)


def round_to_nearest_params(weight: torch.Tensor, scheme: AffineScheme,
                            name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's ``Quantizer.find_params`` per group: the range ``[min(w, 0), max(w, 0)]`` on ``2**bits``
    levels; symmetric: ``[-absmax, absmax]`` with the zero point at ``2**(bits - 1)``.

    Zero points stay within ``[1, maxq]``: the GPTQ checkpoint layout stores ``zero - 1``, and a zero
    of 0 would wrap (a known defect of that layout), so an all-non-negative group gets zero 1 and the
    scale that puts its maximum on the top level.
    """
    check_finite(weight, name)
    maxq = 2**scheme.bits - 1
    groups = grouped(weight, scheme)
    lo = groups.amin(-1).clamp(max=0)
    hi = groups.amax(-1).clamp(min=0)
    if scheme.sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    empty = hi == lo
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    if scheme.sym:
        scale = (hi - lo) / maxq
        zero = torch.full_like(scale, float(2 ** (scheme.bits - 1)))
        return scale, zero
    scale = (hi - lo) / maxq
    return storable_zero(scale, torch.round(-lo / scale), hi, maxq)


def storable_zero(scale: torch.Tensor, zero: torch.Tensor, hi: torch.Tensor,
                  maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` with every zero point at least 1: GPTQ's layout stores ``zero - 1``, so a group whose
    zero point rounds to 0 gets zero 1 and the scale ``hi / (maxq - 1)`` that keeps its maximum ``hi`` on the
    top level."""
    at_zero = zero < 1
    return torch.where(at_zero, hi / (maxq - 1), scale), torch.where(at_zero, 1.0, zero)
