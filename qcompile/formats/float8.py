"""float8 (e4m3) weight-only: quanto's float8 weights, one float32 scale per output row.

``scale[n] = max |W[n, :]| / 448`` (448: e4m3's largest finite value), ``q = (W / scale).to(float8_e4m3fn)``
(round to nearest even, as torch converts), ``W = q.float() * scale``. The float8 values are stored as
their bytes (uint8 [N, K]), which every kernel can load; the decode is e4m3's bit layout (sign, 4-bit
exponent with bias 7, 3-bit mantissa, subnormals below exponent 1).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.formats.scheme import PackedWeight, Scheme, check_finite, register_scheme

E4M3_MAX = 448.0


@register_scheme
@dataclasses.dataclass(frozen=True)
class Float8(Scheme):
    """float8 e4m3 weights with a per-row scale (quanto's ``weights="float8"``); activations stay float."""

    kind = "float8"

    def pack(self, weight: torch.Tensor, name: str = "weight") -> PackedFloat8:
        check_finite(weight, name)
        w = weight.detach().float()
        scale = (w.abs().amax(1) / E4M3_MAX).clamp(min=1e-12)
        q = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return PackedFloat8(self, tuple(weight.shape), weight.dtype, q.view(torch.uint8), scale)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """``8 + 32 / in_features`` (a float32 scale per row)."""
        return 8 + 32 / shape[1]


class PackedFloat8(PackedWeight):
    """float8 e4m3 bytes [N, K] (uint8) and a float32 scale per row [N]."""

    scheme: Float8

    def __init__(self, scheme: Float8, shape: tuple[int, int], dtype: torch.dtype, weight: torch.Tensor,
                 scale: torch.Tensor) -> None:
        self.scheme = scheme
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.weight = weight
        self.scale = scale

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"weight": self.weight, "scale": self.scale}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return decode_float8(self.weight, self.scale, dtype or self.dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        self._check_band(start, stop, axis=0)
        return decode_float8(self.weight[start:stop], self.scale[start:stop], dtype or self.dtype)

    def column_band_step(self) -> int | None:
        return 1

    def dequantize_cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        self._check_band(start, stop, axis=1)
        return decode_float8(self.weight[:, start:stop], self.scale, dtype or self.dtype)


def decode_float8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``float(e4m3 bytes) * scale[row]`` in float32, cast to ``dtype``."""
    return (weight.view(torch.float8_e4m3fn).float() * scale.float()[:, None]).to(dtype)
