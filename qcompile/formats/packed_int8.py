"""Row-wise (per output channel) absmax int8 weights: LLM.int8(), int8 weight-only and W8A8.

All three store ``q = round(w * (127 / absmax(row)))`` as int8 [N, K] with one float32 per
row. They differ in what that float is and in how the weight is read:

* LLM.int8() (:class:`PackedInt8`) follows bitsandbytes ``Int8Params`` exactly: the weight
  is cast to float16 first, and the float is the row absmax itself (bitsandbytes' ``SCB``).
* weight-only and W8A8 (:class:`PackedInt8PerChannel`) quantize the weight in float32 and
  store the dequantization scale ``absmax / 127`` (``w ~= q * scale``).

Rows are processed in chunks, so the only float copy of the weight is one chunk.
An all-zero row gets q = 0 and scale 0 (bitsandbytes would compute 0 * inf = NaN there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from qcompile.formats.scheme import PackedWeight, Scheme, check_finite

if TYPE_CHECKING:
    from qcompile.formats.int8 import Int8

# Rows per chunk are chosen so that a chunk holds about this many elements.
CHUNK_ELEMENTS = 1 << 18
# bitsandbytes' dequantization multiplier 1/127, as a float literal (int8_vectorwise_dequant).
INV_127 = 7.874015718698502e-3


def rowwise_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round(rows * (127 / absmax)).to(int8), absmax)`` per row of a 2-D float tensor.

    The arithmetic is bitsandbytes' ``int8_vectorwise_quant`` (threshold 0): absmax in the
    input dtype then float32, the multiplier ``127 / absmax`` in float32, the product in
    float32 (the input is promoted), round half to even. All-zero rows give zeros.
    """
    absmax = rows.abs().amax(dim=1).float()
    multiplier = torch.where(absmax == 0, torch.zeros_like(absmax), 127.0 / absmax)
    return torch.round(rows * multiplier[:, None]).to(torch.int8), absmax


def _quantize_rows(weight: torch.Tensor, cast: torch.dtype, name: str, hint: str = "") -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    absmax = torch.empty(n, dtype=torch.float32, device=weight.device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)
        q[r0:r1], absmax[r0:r1] = rowwise_int8(weight[r0:r1].to(cast))
    check_finite(absmax, name, hint)
    return q, absmax


class PackedInt8(PackedWeight):
    """An LLM.int8() weight (bitsandbytes ``Linear8bitLt``) as ``qcompile::linear_int8`` consumes it.

    weight: int8 [N, K] (bitsandbytes' ``CB``); weight_scale: float32 [N], the row absmax of the
    float16 weight (bitsandbytes' ``SCB``), so ``w ~= weight * weight_scale / 127``.
    master: the float16 weight when ``scheme.has_fp16_weight``, else None.
    """

    scheme: Int8

    def __init__(self, scheme: Int8, weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype,
                 master: torch.Tensor | None = None) -> None:
        self.scheme = scheme
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.dtype = dtype
        self.weight = weight
        self.weight_scale = weight_scale
        self.master = master

    @classmethod
    def quantize(cls, weight: torch.Tensor, scheme: Int8, name: str = "weight") -> PackedInt8:
        """bitsandbytes ``Int8Params._quantize``: cast to float16, row-wise absmax int8."""
        with torch.no_grad():
            w = weight.detach()
            q, scb = _quantize_rows(w, torch.float16, name, " (after the float16 cast LLM.int8() applies, "
                                    "|w| > 65504 overflows)")
            master = w.to(torch.float16, copy=True) if scheme.has_fp16_weight else None
        return cls(scheme, q, scb, weight.dtype, master)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"weight": self.weight, "weight_scale": self.weight_scale}

    @property
    def nbytes(self) -> int:
        """int8 weight + scales, plus the float16 master weight when it is kept."""
        extra = 0 if self.master is None else self.master.numel() * self.master.element_size()
        return super().nbytes + extra

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``weight * SCB / 127`` as bitsandbytes' ``int8_vectorwise_dequant`` computes it, cast to ``dtype``."""
        return (self.weight * self.weight_scale.view(-1, 1) * INV_127).to(dtype or self.dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize(dtype)[start:stop]``, bit for bit (the arithmetic is per element)."""
        self._check_band(start, stop, axis=0)
        rows = self.weight[start:stop] * self.weight_scale[start:stop].view(-1, 1) * INV_127
        return rows.to(dtype or self.dtype)

    def column_band_step(self) -> int | None:
        return 1

    def dequantize_cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize(dtype)[:, start:stop]``, bit for bit."""
        self._check_band(start, stop, axis=1)
        return (self.weight[:, start:stop] * self.weight_scale.view(-1, 1) * INV_127).to(dtype or self.dtype)

    def to_bitsandbytes(self) -> dict[str, torch.Tensor]:
        """What ``bitsandbytes.nn.Linear8bitLt`` writes: ``weight`` (int8), ``SCB`` and ``weight_format`` (0 = row).

        With ``has_fp16_weight`` bitsandbytes keeps and writes only the float16 ``weight``.
        """
        if self.master is not None:
            return {"weight": self.master}
        return {
            "weight": self.weight,
            "SCB": self.weight_scale,
            "weight_format": torch.tensor(0, dtype=torch.uint8),
        }

    @classmethod
    def _bnb_matches(cls, state: Mapping[str, torch.Tensor]) -> bool:
        return "SCB" in state

    @classmethod
    def _from_bnb(cls, state: Mapping[str, torch.Tensor], compute_dtype: torch.dtype | None) -> PackedInt8:
        from qcompile.formats.int8 import Int8

        if "weight" not in state:
            raise ValueError("weight: missing from the bitsandbytes Linear8bitLt state dict")
        weight, scb = state["weight"], state["SCB"]
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight: expected an int8 [out, in] tensor, got {weight.dtype} {tuple(weight.shape)}")
        if scb.dtype != torch.float32 or tuple(scb.shape) != (weight.shape[0],):
            raise ValueError(f"SCB: expected float32 [{weight.shape[0]}], got {scb.dtype} {tuple(scb.shape)}")
        fmt = state.get("weight_format")
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"weight_format: only 0 (row-major) is supported, got {int(fmt)}")
        # bitsandbytes does not record the threshold or the original dtype; LLM.int8() defaults.
        return cls(Int8(), weight, scb, torch.float16)


class PackedInt8PerChannel(PackedWeight):
    """A per-channel symmetric int8 weight (``Int8WeightOnly``, ``W8A8Dynamic``).

    weight: int8 [N, K]; weight_scale: float32 [N] with ``w ~= weight * weight_scale``.
    """

    def __init__(self, scheme: Scheme, weight: torch.Tensor, weight_scale: torch.Tensor,
                 dtype: torch.dtype) -> None:
        self.scheme = scheme
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.dtype = dtype
        self.weight = weight
        self.weight_scale = weight_scale

    @classmethod
    def quantize(cls, weight: torch.Tensor, scheme: Scheme, name: str = "weight") -> PackedInt8PerChannel:
        """Row-wise absmax int8 in float32: ``q = round(w * 127 / absmax)``, ``scale = absmax / 127``."""
        with torch.no_grad():
            q, absmax = _quantize_rows(weight.detach(), torch.float32, name)
        return cls(scheme, q, absmax / 127.0, weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"weight": self.weight, "weight_scale": self.weight_scale}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype or self.dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize(dtype)[start:stop]``, bit for bit (the arithmetic is per element)."""
        self._check_band(start, stop, axis=0)
        rows = self.weight[start:stop].float() * self.weight_scale[start:stop, None]
        return rows.to(dtype or self.dtype)

    def column_band_step(self) -> int | None:
        return 1

    def dequantize_cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize(dtype)[:, start:stop]``, bit for bit."""
        self._check_band(start, stop, axis=1)
        return (self.weight[:, start:stop].float() * self.weight_scale[:, None]).to(dtype or self.dtype)

    def to_bitsandbytes(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            f"{self.scheme.kind}: bitsandbytes has no module for this format; "
            "use Int8 (LLM.int8(), Linear8bitLt) for a bitsandbytes-compatible int8 weight"
        )


def int8_storage_bytes(shape: tuple[int, int]) -> int:
    """int8 [N, K] + float32 [N]: ``N*K + 4*N`` bytes, i.e. ``8 + 32/K`` bits per weight."""
    return math.prod(shape) + 4 * shape[0]
