"""AWQ (activation-aware weight quantization): scale input features by their activation size before quantizing.

Input features that see large activations matter more to the output; AWQ multiplies weight column
``k`` by ``s[k]`` before round-to-nearest quantization (more precision where it counts) and divides the
input by ``s[k]``. Per linear, with the mean |x| per input feature and a sample of input rows from
calibration (:func:`qcompile.calibrate`), AutoAWQ's grid search:

    w_mean[k] = mean over rows of |W[n, k]| / max |W| of (n, k)'s group
    for r in 0, 1/20, ..., 19/20:
        s = x_mean**r / (w_mean**(1 - r) + 1e-4), clamped >= 1e-4, divided by sqrt(max(s) * min(s))
        error(r) = || X W^T - (X / s) Q(W s)^T ||^2          Q: AWQ's round-to-nearest (group min / max)
    keep the s of the smallest error

then AutoAWQ's clip search on ``W s``: per output row and group, the largest magnitude ``m`` kept
(``W`` clamped to ``[-m, m]``) from ``max |W| * (1 - i / 20)``, i = 0..9, that least changes the group's
part of the output on (a 512-row subsample of) ``X / s``.

The quantized ``W s`` is stored in GPTQ's layout with ``input_scale = 1 / s`` (``packed_affine.py``),
which the op applies to the input. Where the linears' shared input (q, k, v) is made by a norm that
nothing else reads, :func:`qcompile.calibrate` searches one ``s`` for them on their concatenated weights,
as AutoAWQ does, and folds ``1 / s`` into the norm (``passes/scale_fold.py``): those packed forms keep no
input scale. Only asymmetric (``zero_point``) quantization, as AWQ's GEMM format.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qcompile.formats.affine import AffineScheme, grouped, storable_zero
from qcompile.formats.observations import Observations
from qcompile.formats.scheme import check_finite, register_scheme

GRID = 20
CLIP_STEPS = 10  # shrink the range by up to (CLIP_STEPS - 1) / GRID = 45%
CLIP_ROWS = 512  # input rows the clip search scores with (AutoAWQ: 512 tokens)
CLIP_CHUNK = 256  # output rows scored at once, bounding the [rows, CLIP_ROWS, groups] error tensor


@register_scheme
@dataclasses.dataclass(frozen=True)
class AWQ(AffineScheme):
    """AWQ (see the module docstring); AutoAWQ's defaults: 4 bits, group 128, zero point."""

    kind = "awq"
    calibration: ClassVar[str | None] = "activations"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sym:
            raise ValueError("awq.sym: true is not allowed; AWQ quantizes with a zero point (allowed: false)")

    def pack(self, weight: torch.Tensor, name: str = "weight"):
        raise ValueError(f"{name}: awq needs calibration data (the sizes of the layer's inputs): quantize with "
                         "qcompile.calibrate(model, batches, config) before compiling")

    def fit(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """AWQ's round-to-nearest per group: the group's own min / max (0 need not be inside), zero point
        ``-round(min / scale)``; where that is 0 (a group of non-negative weights, or nearly), the zero point
        is 1 and the scale puts the maximum on the top level, since GPTQ's layout stores ``zero - 1``."""
        check_finite(weight, name)
        maxq = 2**self.bits - 1
        groups = grouped(weight, self)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = (hi - lo).clamp(min=1e-5) / maxq
        zero = torch.clamp(-torch.round(lo / scale), 0, maxq)
        return storable_zero(scale, zero, hi.clamp(min=1e-5), maxq)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` quantized and dequantized with :meth:`fit` (float32), as the search scores it."""
        scale, zero = self.fit(weight, "weight")
        groups = grouped(weight, self)
        scale16 = scale.half().float()[..., None]
        q = torch.clamp(torch.round(groups / scale16) + zero[..., None], 0, 2**self.bits - 1)
        return ((q - zero[..., None]) * scale16).reshape(weight.shape)

    def pack_calibrated(self, weight: torch.Tensor, observations: Observations, name: str = "weight",
                        scale: torch.Tensor | None = None):
        """Search the input scaling (module docstring; ``scale``: one already searched for all the linears that
        share this input, as :func:`qcompile.calibrate` does), then pack ``W s`` with ``input_scale = 1 / s``."""
        from qcompile.formats.packed_affine import PackedAffine

        reason = self.unsupported_reason(tuple(weight.shape), weight.dtype)
        if reason is not None:
            raise ValueError(f"{name}: cannot pack with awq: {reason}")
        w = weight.detach().float()
        sample = observations.sample_rows
        s = search_scale(w, observations.abs_mean, sample, self) if scale is None else scale.float()
        scaled = search_clip(w * s[None, :], sample / s, self)
        scale, zero = self.fit(scaled, name)
        return PackedAffine.quantize(scaled, self, scale, zero, input_scale=(1.0 / s).float(), dtype=weight.dtype)


def search_scale(weight: torch.Tensor, x_mean: torch.Tensor, sample: torch.Tensor, scheme: AWQ) -> torch.Tensor:
    """AutoAWQ's ``_search_best_scale`` for one linear: the per-input-feature ``s`` [K] of least output error."""
    groups = grouped(weight.abs(), scheme)
    w_mean = (groups / (groups.amax(-1, keepdim=True) + 1e-6)).reshape(weight.shape).mean(0)
    reference = sample @ weight.t()
    best_error, best = float("inf"), torch.ones_like(x_mean)
    for step in range(GRID):
        ratio = step / GRID
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        output = (sample / s) @ scheme.fake_quantize(weight * s[None, :]).t()
        error = float((reference - output).square().mean())
        if error < best_error:
            best_error, best = error, s
    return best


def search_clip(weight: torch.Tensor, sample: torch.Tensor, scheme: AWQ) -> torch.Tensor:
    """AutoAWQ's ``_search_best_clip``: ``weight`` [N, K] with each (row, group) clamped to the range of least
    error of that group's partial output on ``sample`` [T, K] (see the module docstring)."""
    rows = sample[:: max(1, sample.shape[0] // CLIP_ROWS)][:CLIP_ROWS]
    x_groups = grouped(rows, scheme)  # [T, G, group_size]
    clipped = torch.empty_like(weight)
    for start in range(0, weight.shape[0], CLIP_CHUNK):
        w = weight[start : start + CLIP_CHUNK]
        w_groups = grouped(w, scheme)  # [n, G, group_size]
        reference = torch.einsum("tgk,ngk->ntg", x_groups, w_groups)
        limit = w_groups.abs().amax(-1, keepdim=True)
        best_error = best = None
        for step in range(CLIP_STEPS):
            bound = limit * (1 - step / GRID)
            candidate = torch.maximum(torch.minimum(w_groups, bound), -bound)
            quantized = grouped(scheme.fake_quantize(candidate.reshape(w.shape)), scheme)
            error = (torch.einsum("tgk,ngk->ntg", x_groups, quantized) - reference).square().mean(1)  # [n, G]
            if best_error is None:
                best_error, best = error, bound
            else:
                better = (error < best_error)[..., None]
                best_error = torch.minimum(error, best_error)
                best = torch.where(better, bound, best)
        clipped[start : start + CLIP_CHUNK] = torch.maximum(torch.minimum(w_groups, best), -best).reshape(w.shape)
    return clipped
